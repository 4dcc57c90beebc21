//! The mesh node: a [`Mesh`] handle and the actor that owns the libp2p swarm.
//!
//! The actor runs the swarm (TCP, Noise, Yamux; identify; mDNS; gossipsub; the chunk
//! protocol; connection limits and a block list for bans) and answers commands from the
//! handle. Serving reads the [`ChunkProvider`] on a blocking thread, at most
//! [`MeshConfig::max_uploads`] at a time (beyond that peers are told `Busy`). Fetching asks
//! one peer at a time per call, the fastest free one first, with at most
//! [`MAX_IN_FLIGHT_PER_PEER`] requests per peer; callers fetch many chunks in parallel, so
//! load spreads over peers. Every object is verified against its id before [`Mesh::fetch`]
//! returns it; a peer that sends a bad one is disconnected and banned for
//! [`MeshConfig::ban_for`].

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use flotilla_core::ids::ChunkId;
use flotilla_core::manifest::VerifiedManifest;
use flotilla_core::time::Timestamp;
use flotilla_core::trust::TrustRoot;
use futures::StreamExt as _;
use libp2p::multiaddr::Protocol;
use libp2p::request_response::{self, OutboundRequestId, ProtocolSupport, ResponseChannel};
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{Multiaddr, PeerId, Swarm, allow_block_list, connection_limits, gossipsub, identify, identity, mdns};
use tokio::sync::{broadcast, mpsc, oneshot};

use crate::protocol::{ChunkCodec, ChunkRequest, ChunkResponse, PROTOCOL};
use crate::store::ChunkProvider;

/// Requests in flight to one peer (DESIGN.md: up to 3).
pub const MAX_IN_FLIGHT_PER_PEER: usize = 3;
/// The gossipsub topic of signed release announcements.
pub const RELEASES_TOPIC: &str = "flotilla/releases/1";
/// Largest announcement: a manifest envelope is a few KiB; gossipsub's own default is 64 KiB.
pub const MAX_ANNOUNCEMENT_LEN: usize = 128 << 10;
/// How often bans are lifted and bootstrap peers redialled.
const TICK: Duration = Duration::from_secs(1);
/// Throughput assumed for a peer not measured yet (bytes/s): optimistic, so new peers get tried.
const UNMEASURED_BPS: f64 = 64e6;
/// identify's protocol string: peers of another fleet protocol are not our peers.
const IDENTIFY_PROTOCOL: &str = "/flotilla/id/1";

/// What a node is; peers learn it through identify's agent version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// A device agent: it installs releases and takes part in origin rendezvous.
    Agent,
    /// A site cache: it serves what it stores and fetches nothing for itself.
    Cache,
}

impl Role {
    fn agent_version(self) -> String {
        match self {
            Self::Agent => format!("flotilla-agent/{}", env!("CARGO_PKG_VERSION")),
            Self::Cache => format!("flotilla-mesh/{}", env!("CARGO_PKG_VERSION")),
        }
    }

    fn from_agent_version(v: &str) -> Option<Self> {
        if v.starts_with("flotilla-agent/") {
            Some(Self::Agent)
        } else if v.starts_with("flotilla-mesh/") {
            Some(Self::Cache)
        } else {
            None
        }
    }
}

/// Mesh settings.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct MeshConfig {
    /// What this node is.
    pub role: Role,
    /// Addresses to listen on, e.g. `/ip4/0.0.0.0/tcp/4001`.
    pub listen: Vec<Multiaddr>,
    /// Peers dialled at start and redialled while not connected; each ends in `/p2p/<id>`.
    pub bootstrap: Vec<Multiaddr>,
    /// Discover peers on the local network with mDNS.
    pub mdns: bool,
    /// Connections at most (incoming and outgoing together).
    pub max_connections: u32,
    /// Chunks served at once; further requests are answered `Busy`.
    pub max_uploads: usize,
    /// Chunks served at once to one peer, so one peer cannot take every upload slot.
    pub max_uploads_per_peer: usize,
    /// Upload budget in object bytes per second over all peers (bursts of one second);
    /// `None`: unlimited. Over budget, requests are answered `Busy`.
    pub max_upload_rate: Option<u64>,
    /// How long a peer that sent a bad chunk stays banned.
    pub ban_for: Duration,
    /// Limit of one chunk request.
    pub request_timeout: Duration,
    /// Announcements are verified against this root; without one they are ignored.
    pub trust_root: Option<TrustRoot>,
    /// The node's identity; `None`: a new one each start.
    pub keypair: Option<identity::Keypair>,
}

impl MeshConfig {
    /// Defaults for `role`: listen on every IPv4 address on a random TCP port, mDNS on,
    /// 64 connections, 8 uploads at once (4 per peer), no upload rate cap, bans of 10
    /// minutes, 30 s per request.
    pub fn new(role: Role) -> Self {
        Self {
            role,
            listen: vec![Multiaddr::from(std::net::Ipv4Addr::UNSPECIFIED).with(Protocol::Tcp(0))],
            bootstrap: Vec::new(),
            mdns: true,
            max_connections: 64,
            max_uploads: 8,
            max_uploads_per_peer: 4,
            max_upload_rate: None,
            ban_for: Duration::from_secs(600),
            request_timeout: Duration::from_secs(30),
            trust_root: None,
            keypair: None,
        }
    }
}

/// Why the mesh could not start or do something.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MeshError {
    /// The swarm could not be built or could not listen.
    #[error("starting the mesh: {0}")]
    Start(String),
    /// The node has stopped.
    #[error("the mesh node has stopped")]
    Stopped,
    /// No peer could provide the chunk.
    #[error("no peer provided chunk {id} ({asked} asked)")]
    NotFound {
        /// The chunk.
        id: ChunkId,
        /// Peers asked.
        asked: usize,
    },
    /// An announcement could not be published (no peer subscribed, too large…).
    #[error("announcing: {0}")]
    Announce(String),
}

/// Counters of a node, for logs and metrics.
#[derive(Debug, Default)]
struct Counters {
    served_chunks: AtomicU64,
    served_bytes: AtomicU64,
    busy: AtomicU64,
    fetched_chunks: AtomicU64,
    fetched_bytes: AtomicU64,
    bad_chunks: AtomicU64,
    bans: AtomicU64,
}

/// A snapshot of a node's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MeshStats {
    /// Chunks served to peers.
    pub served_chunks: u64,
    /// Object bytes served to peers.
    pub served_bytes: u64,
    /// Requests answered `Busy`.
    pub busy: u64,
    /// Verified chunks fetched from peers.
    pub fetched_chunks: u64,
    /// Object bytes of those.
    pub fetched_bytes: u64,
    /// Chunks from peers that failed verification.
    pub bad_chunks: u64,
    /// Peers banned.
    pub bans: u64,
    /// Peers connected now.
    pub peers: u64,
}

/// A connected peer as the handle reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerInfo {
    /// Its id.
    pub id: PeerId,
    /// Its role, once identify told us.
    pub role: Option<Role>,
}

/// A chunk a peer delivered and that verified.
#[derive(Debug, Clone)]
pub struct Fetched {
    /// The object as received (what a cache stores).
    pub object: Vec<u8>,
    /// The chunk's bytes, verified against its id.
    pub data: Vec<u8>,
    /// Who sent it.
    pub peer: PeerId,
}

enum Command {
    Request { req: ChunkRequest, exclude: HashSet<PeerId>, reply: oneshot::Sender<Option<(PeerId, Answer)>> },
    Ban { peer: PeerId },
    Peers { reply: oneshot::Sender<Vec<PeerInfo>> },
    ListenAddrs { reply: oneshot::Sender<Vec<Multiaddr>> },
    Announce { envelope: Vec<u8>, reply: oneshot::Sender<Result<(), MeshError>> },
}

/// What one peer answered.
enum Answer {
    Response(ChunkResponse),
    Failed,
}

/// The handle of a running mesh node. Cheap to clone; the node stops when every handle is
/// dropped.
#[derive(Debug, Clone)]
pub struct Mesh {
    tx: mpsc::Sender<Command>,
    local: PeerId,
    counters: Arc<Counters>,
    announcements: broadcast::Sender<VerifiedManifest>,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Request { .. } => "Request",
            Self::Ban { .. } => "Ban",
            Self::Peers { .. } => "Peers",
            Self::ListenAddrs { .. } => "ListenAddrs",
            Self::Announce { .. } => "Announce",
        })
    }
}

impl Mesh {
    /// Starts a node serving from `provider` and waits until it listens on every
    /// [`MeshConfig::listen`] address.
    ///
    /// # Errors
    /// [`MeshError::Start`].
    pub async fn start(config: MeshConfig, provider: Arc<dyn ChunkProvider>) -> Result<Self, MeshError> {
        let key = config.keypair.clone().unwrap_or_else(identity::Keypair::generate_ed25519);
        let local = key.public().to_peer_id();
        let mut swarm = build_swarm(&config, key)?;
        let mut waiting = config.listen.len();
        for addr in &config.listen {
            swarm.listen_on(addr.clone()).map_err(|e| MeshError::Start(format!("listening on {addr}: {e}")))?;
        }
        // Wait for the listeners so callers can print and hand out real addresses.
        let mut addrs = Vec::new();
        let started = Instant::now();
        while waiting > 0 {
            let ev = tokio::time::timeout(Duration::from_secs(10).saturating_sub(started.elapsed()), swarm.next())
                .await
                .map_err(|_| MeshError::Start("listeners did not come up".into()))?;
            match ev {
                Some(SwarmEvent::NewListenAddr { address, .. }) => {
                    // One listener on 0.0.0.0 reports every interface; count the listener once.
                    if addrs.is_empty() || !addrs.iter().any(|a: &Multiaddr| same_listener(a, &address)) {
                        waiting = waiting.saturating_sub(1);
                    }
                    addrs.push(address);
                }
                Some(SwarmEvent::ListenerError { error, .. }) => return Err(MeshError::Start(error.to_string())),
                Some(SwarmEvent::ListenerClosed { reason: Err(e), .. }) => return Err(MeshError::Start(e.to_string())),
                Some(_) => {}
                None => return Err(MeshError::Stopped),
            }
        }
        let topic = gossipsub::IdentTopic::new(RELEASES_TOPIC);
        swarm
            .behaviour_mut()
            .gossipsub
            .subscribe(&topic)
            .map_err(|e| MeshError::Start(format!("subscribing to announcements: {e}")))?;
        let (tx, rx) = mpsc::channel(256);
        let counters = Arc::new(Counters::default());
        let (announcements, _) = broadcast::channel(16);
        let (served_tx, served_rx) = mpsc::channel(64);
        let upload_budget = config.max_upload_rate.map_or(0.0, |r| r as f64);
        let mut actor = MeshActor {
            swarm,
            rx,
            config,
            provider,
            counters: counters.clone(),
            announcements: announcements.clone(),
            topic,
            listen_addrs: addrs,
            peers: HashMap::new(),
            banned: HashMap::new(),
            pending: HashMap::new(),
            queue: VecDeque::new(),
            uploads: 0,
            uploads_by_peer: HashMap::new(),
            upload_budget,
            budget_at: Instant::now(),
            served_tx,
            served_rx,
        };
        for addr in actor.config.bootstrap.clone() {
            actor.dial(addr);
        }
        tokio::spawn(async move { actor.run().await });
        Ok(Self { tx, local, counters, announcements })
    }

    /// This node's peer id.
    pub fn peer_id(&self) -> PeerId {
        self.local
    }

    /// The addresses the node listens on, each with `/p2p/<id>` appended.
    ///
    /// # Errors
    /// [`MeshError::Stopped`].
    pub async fn listen_addrs(&self) -> Result<Vec<Multiaddr>, MeshError> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::ListenAddrs { reply }).await?;
        Ok(rx.await.map_err(|_| MeshError::Stopped)?.into_iter().map(|a| a.with(Protocol::P2p(self.local))).collect())
    }

    /// Connected peers that are not banned.
    ///
    /// # Errors
    /// [`MeshError::Stopped`].
    pub async fn peers(&self) -> Result<Vec<PeerInfo>, MeshError> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Peers { reply }).await?;
        rx.await.map_err(|_| MeshError::Stopped)
    }

    /// Waits until at least `n` peers are connected and identified, or `timeout` passes;
    /// returns the peers connected then.
    ///
    /// # Errors
    /// [`MeshError::Stopped`].
    pub async fn wait_for_peers(&self, n: usize, timeout: Duration) -> Result<Vec<PeerInfo>, MeshError> {
        let deadline = Instant::now() + timeout;
        loop {
            let peers = self.peers().await?;
            if peers.iter().filter(|p| p.role.is_some()).count() >= n || Instant::now() >= deadline {
                return Ok(peers);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Fetches chunk `id` (`len` bytes) from peers: the fastest free peer first, the next
    /// one when a peer lacks it, is busy or fails. A peer whose object does not verify is
    /// banned and the next one asked.
    ///
    /// # Errors
    /// [`MeshError::NotFound`] when every connected peer was asked; [`MeshError::Stopped`].
    pub async fn fetch(&self, id: ChunkId, len: u32) -> Result<Fetched, MeshError> {
        let req = ChunkRequest { id, len };
        let mut exclude = HashSet::new();
        loop {
            let (reply, rx) = oneshot::channel();
            self.send(Command::Request { req, exclude: exclude.clone(), reply }).await?;
            let Some((peer, answer)) = rx.await.map_err(|_| MeshError::Stopped)? else {
                return Err(MeshError::NotFound { id, asked: exclude.len() });
            };
            exclude.insert(peer);
            let ChunkResponse::Object(object) = (match answer {
                Answer::Response(r) => r,
                Answer::Failed => continue,
            }) else {
                continue;
            };
            let (obj, checked) = tokio::task::spawn_blocking(move || {
                let r = if object.len() as u64 > flotilla_core::object::max_object_len(len) {
                    Err(flotilla_core::object::ObjectError::Empty)
                } else {
                    flotilla_core::object::decode(&object, &id, len)
                };
                (object, r)
            })
            .await
            .map_err(|_| MeshError::Stopped)?;
            match checked {
                Ok(data) => {
                    self.counters.fetched_chunks.fetch_add(1, Ordering::Relaxed);
                    self.counters.fetched_bytes.fetch_add(obj.len() as u64, Ordering::Relaxed);
                    return Ok(Fetched { object: obj, data, peer });
                }
                Err(e) => {
                    self.counters.bad_chunks.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(%peer, chunk = %id, error = %e, "peer sent a bad chunk; banning it");
                    self.send(Command::Ban { peer }).await?;
                }
            }
        }
    }

    /// Bans `peer` for [`MeshConfig::ban_for`] and disconnects it.
    ///
    /// # Errors
    /// [`MeshError::Stopped`].
    pub async fn ban(&self, peer: PeerId) -> Result<(), MeshError> {
        self.send(Command::Ban { peer }).await
    }

    /// Publishes a signed manifest envelope on [`RELEASES_TOPIC`].
    ///
    /// # Errors
    /// [`MeshError::Announce`] (for instance when no peer subscribes yet).
    pub async fn announce(&self, envelope: Vec<u8>) -> Result<(), MeshError> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Announce { envelope, reply }).await?;
        rx.await.map_err(|_| MeshError::Stopped)?
    }

    /// Announcements that verified against [`MeshConfig::trust_root`], from now on.
    pub fn announcements(&self) -> broadcast::Receiver<VerifiedManifest> {
        self.announcements.subscribe()
    }

    /// The counters now.
    ///
    /// # Errors
    /// [`MeshError::Stopped`].
    pub async fn stats(&self) -> Result<MeshStats, MeshError> {
        let peers = self.peers().await?.len() as u64;
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let c = &self.counters;
        Ok(MeshStats {
            served_chunks: g(&c.served_chunks),
            served_bytes: g(&c.served_bytes),
            busy: g(&c.busy),
            fetched_chunks: g(&c.fetched_chunks),
            fetched_bytes: g(&c.fetched_bytes),
            bad_chunks: g(&c.bad_chunks),
            bans: g(&c.bans),
            peers,
        })
    }

    async fn send(&self, cmd: Command) -> Result<(), MeshError> {
        self.tx.send(cmd).await.map_err(|_| MeshError::Stopped)
    }
}

fn same_listener(a: &Multiaddr, b: &Multiaddr) -> bool {
    let port = |m: &Multiaddr| {
        m.iter().find_map(|p| match p {
            Protocol::Tcp(port) => Some(port),
            _ => None,
        })
    };
    port(a) == port(b)
}

#[derive(NetworkBehaviour)]
struct Behaviour {
    limits: connection_limits::Behaviour,
    blocked: allow_block_list::Behaviour<allow_block_list::BlockedPeers>,
    identify: identify::Behaviour,
    mdns: Toggle<mdns::tokio::Behaviour>,
    gossipsub: gossipsub::Behaviour,
    chunks: request_response::Behaviour<ChunkCodec>,
}

fn build_swarm(config: &MeshConfig, key: identity::Keypair) -> Result<Swarm<Behaviour>, MeshError> {
    let start = |e: &dyn std::fmt::Display| MeshError::Start(e.to_string());
    let mdns_on = config.mdns;
    let role = config.role;
    let limits = connection_limits::ConnectionLimits::default()
        .with_max_established(Some(config.max_connections))
        .with_max_established_per_peer(Some(2))
        .with_max_pending_incoming(Some(config.max_connections));
    let request_timeout = config.request_timeout;
    let swarm = libp2p::SwarmBuilder::with_existing_identity(key)
        .with_tokio()
        .with_tcp(
            libp2p::tcp::Config::default().nodelay(true),
            libp2p::noise::Config::new,
            libp2p::yamux::Config::default,
        )
        .map_err(|e| start(&e))?
        .with_behaviour(|key| {
            let peer_id = key.public().to_peer_id();
            let gossip_config = gossipsub::ConfigBuilder::default()
                .max_transmit_size(MAX_ANNOUNCEMENT_LEN)
                .validation_mode(gossipsub::ValidationMode::Strict)
                .validate_messages()
                .build()
                .map_err(|e| std::io::Error::other(e.to_string()))?;
            let gossipsub =
                gossipsub::Behaviour::new(gossipsub::MessageAuthenticity::Signed(key.clone()), gossip_config)
                    .map_err(std::io::Error::other)?;
            let mdns =
                if mdns_on { Some(mdns::tokio::Behaviour::new(mdns::Config::default(), peer_id)?) } else { None };
            Ok(Behaviour {
                limits: connection_limits::Behaviour::new(limits),
                blocked: allow_block_list::Behaviour::default(),
                identify: identify::Behaviour::new(
                    identify::Config::new(IDENTIFY_PROTOCOL.into(), key.public())
                        .with_agent_version(role.agent_version()),
                ),
                mdns: mdns.into(),
                gossipsub,
                chunks: request_response::Behaviour::with_codec(
                    ChunkCodec,
                    [(PROTOCOL, ProtocolSupport::Full)],
                    request_response::Config::default()
                        .with_request_timeout(request_timeout)
                        .with_max_concurrent_streams(64),
                ),
            })
        })
        .map_err(|e| start(&e))?
        // Peers stay connected between releases so have-state and gossip keep flowing.
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(300)))
        .build();
    Ok(swarm)
}

#[derive(Debug)]
struct PeerState {
    role: Option<Role>,
    in_flight: usize,
    /// Smoothed delivery rate, bytes per second.
    bps: Option<f64>,
    hits: u64,
    misses: u64,
}

impl PeerState {
    /// Higher is better: expected rate, discounted by how often it lacks chunks and by load.
    fn score(&self) -> f64 {
        let hit_rate = (self.hits as f64 + 1.0) / ((self.hits + self.misses) as f64 + 2.0);
        // Caches hold whole releases: prefer them when nothing is measured yet.
        let cache = if self.role == Some(Role::Cache) { 2.0 } else { 1.0 };
        self.bps.unwrap_or(UNMEASURED_BPS) * hit_rate * cache / (self.in_flight as f64 + 1.0)
    }
}

struct Pending {
    peer: PeerId,
    started: Instant,
    len: u32,
    reply: oneshot::Sender<Option<(PeerId, Answer)>>,
}

struct Queued {
    req: ChunkRequest,
    exclude: HashSet<PeerId>,
    reply: oneshot::Sender<Option<(PeerId, Answer)>>,
}

struct MeshActor {
    swarm: Swarm<Behaviour>,
    rx: mpsc::Receiver<Command>,
    config: MeshConfig,
    provider: Arc<dyn ChunkProvider>,
    counters: Arc<Counters>,
    announcements: broadcast::Sender<VerifiedManifest>,
    topic: gossipsub::IdentTopic,
    listen_addrs: Vec<Multiaddr>,
    peers: HashMap<PeerId, PeerState>,
    banned: HashMap<PeerId, Instant>,
    pending: HashMap<OutboundRequestId, Pending>,
    queue: VecDeque<Queued>,
    uploads: usize,
    uploads_by_peer: HashMap<PeerId, usize>,
    /// Token bucket of [`MeshConfig::max_upload_rate`], in bytes; refilled when read.
    upload_budget: f64,
    budget_at: Instant,
    served_tx: mpsc::Sender<Served>,
    served_rx: mpsc::Receiver<Served>,
}

/// A finished read of the provider, to answer on the swarm.
type Served = (PeerId, ResponseChannel<ChunkResponse>, ChunkResponse);

impl MeshActor {
    async fn run(&mut self) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                cmd = self.rx.recv() => match cmd {
                    Some(cmd) => self.command(cmd),
                    None => break, // every handle dropped
                },
                Some((peer, channel, response)) = self.served_rx.recv() => {
                    self.uploads -= 1;
                    if let Some(n) = self.uploads_by_peer.get_mut(&peer) {
                        *n -= 1;
                        if *n == 0 {
                            self.uploads_by_peer.remove(&peer);
                        }
                    }
                    if let ChunkResponse::Object(obj) = &response {
                        self.upload_budget -= obj.len() as f64;
                        self.counters.served_chunks.fetch_add(1, Ordering::Relaxed);
                        self.counters.served_bytes.fetch_add(obj.len() as u64, Ordering::Relaxed);
                    }
                    // The requester may have gone; nothing to do then.
                    let _ = self.swarm.behaviour_mut().chunks.send_response(channel, response);
                }
                ev = self.swarm.select_next_some() => self.swarm_event(ev),
                _ = tick.tick() => self.tick(),
            }
        }
        tracing::debug!("mesh node stopped");
    }

    fn dial(&mut self, addr: Multiaddr) {
        let peer = addr.iter().find_map(|p| match p {
            Protocol::P2p(id) => Some(id),
            _ => None,
        });
        if peer.is_some_and(|p| self.peers.contains_key(&p) || self.banned.contains_key(&p)) {
            return;
        }
        if let Err(e) = self.swarm.dial(addr.clone()) {
            tracing::debug!(%addr, error = %e, "dial failed");
        }
    }

    fn tick(&mut self) {
        let now = Instant::now();
        let expired: Vec<PeerId> = self.banned.iter().filter(|(_, until)| **until <= now).map(|(p, _)| *p).collect();
        for p in expired {
            self.banned.remove(&p);
            self.swarm.behaviour_mut().blocked.unblock_peer(p);
            tracing::info!(peer = %p, "ban lifted");
        }
        for addr in self.config.bootstrap.clone() {
            self.dial(addr);
        }
    }

    fn command(&mut self, cmd: Command) {
        match cmd {
            Command::Request { req, exclude, reply } => self.request(Queued { req, exclude, reply }),
            Command::Ban { peer } => self.ban(peer),
            Command::Peers { reply } => {
                let list = self
                    .peers
                    .iter()
                    .filter(|(p, _)| !self.banned.contains_key(p))
                    .map(|(p, s)| PeerInfo { id: *p, role: s.role })
                    .collect();
                let _ = reply.send(list);
            }
            Command::ListenAddrs { reply } => {
                let _ = reply.send(self.listen_addrs.clone());
            }
            Command::Announce { envelope, reply } => {
                let r = self
                    .swarm
                    .behaviour_mut()
                    .gossipsub
                    .publish(self.topic.clone(), envelope)
                    .map(|_| ())
                    .map_err(|e| MeshError::Announce(e.to_string()));
                let _ = reply.send(r);
            }
        }
    }

    fn ban(&mut self, peer: PeerId) {
        if self.banned.insert(peer, Instant::now() + self.config.ban_for).is_none() {
            self.counters.bans.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%peer, for_s = self.config.ban_for.as_secs(), "peer banned");
        }
        self.swarm.behaviour_mut().blocked.block_peer(peer);
        let _ = self.swarm.disconnect_peer_id(peer);
    }

    /// Sends `q` to the best free peer, queues it while every candidate is at its limit, or
    /// answers `None` when there is no candidate at all.
    fn request(&mut self, q: Queued) {
        let candidates: Vec<(&PeerId, &PeerState)> =
            self.peers.iter().filter(|(p, _)| !q.exclude.contains(p) && !self.banned.contains_key(p)).collect();
        if candidates.is_empty() {
            let _ = q.reply.send(None);
            return;
        }
        let best = candidates
            .iter()
            .filter(|(_, s)| s.in_flight < MAX_IN_FLIGHT_PER_PEER)
            .max_by(|a, b| a.1.score().total_cmp(&b.1.score()))
            .map(|(p, _)| **p);
        let Some(peer) = best else {
            self.queue.push_back(q);
            return;
        };
        if let Some(s) = self.peers.get_mut(&peer) {
            s.in_flight += 1;
        }
        let id = self.swarm.behaviour_mut().chunks.send_request(&peer, q.req);
        self.pending.insert(id, Pending { peer, started: Instant::now(), len: q.req.len, reply: q.reply });
    }

    /// Retries queued requests after a peer freed a slot or left.
    fn drain_queue(&mut self) {
        for q in std::mem::take(&mut self.queue) {
            if !q.reply.is_closed() {
                self.request(q);
            }
        }
    }

    fn finish(&mut self, id: OutboundRequestId, answer: Answer) {
        let Some(p) = self.pending.remove(&id) else { return };
        // Whatever a banned peer still had in flight is dropped unread.
        let answer = if self.banned.contains_key(&p.peer) { Answer::Failed } else { answer };
        if let Some(s) = self.peers.get_mut(&p.peer) {
            s.in_flight = s.in_flight.saturating_sub(1);
            match &answer {
                Answer::Response(ChunkResponse::Object(obj)) => {
                    s.hits += 1;
                    let secs = p.started.elapsed().as_secs_f64().max(1e-4);
                    let rate = obj.len().max(p.len as usize / 4) as f64 / secs;
                    s.bps = Some(s.bps.map_or(rate, |old| old * 0.8 + rate * 0.2));
                }
                Answer::Response(ChunkResponse::NotFound) => s.misses += 1,
                Answer::Response(ChunkResponse::Busy) | Answer::Failed => {}
            }
        }
        let _ = p.reply.send(Some((p.peer, answer)));
        self.drain_queue();
    }

    fn swarm_event(&mut self, ev: SwarmEvent<BehaviourEvent>) {
        match ev {
            SwarmEvent::Behaviour(BehaviourEvent::Chunks(ev)) => self.chunk_event(ev),
            SwarmEvent::Behaviour(BehaviourEvent::Identify(identify::Event::Received { peer_id, info, .. })) => {
                let role = Role::from_agent_version(&info.agent_version);
                if let Some(s) = self.peers.get_mut(&peer_id) {
                    s.role = role;
                }
                tracing::debug!(peer = %peer_id, agent = %info.agent_version, "peer identified");
            }
            SwarmEvent::Behaviour(BehaviourEvent::Identify(_)) => {}
            SwarmEvent::Behaviour(BehaviourEvent::Mdns(mdns::Event::Discovered(found))) => {
                for (peer, addr) in found {
                    if !self.peers.contains_key(&peer) && !self.banned.contains_key(&peer) {
                        tracing::debug!(%peer, %addr, "discovered on the local network");
                        self.dial(addr.with(Protocol::P2p(peer)));
                    }
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Mdns(mdns::Event::Expired(_))) => {}
            SwarmEvent::Behaviour(BehaviourEvent::Gossipsub(ev)) => self.gossip_event(ev),
            SwarmEvent::Behaviour(BehaviourEvent::Limits(v)) | SwarmEvent::Behaviour(BehaviourEvent::Blocked(v)) => {
                match v {}
            }
            SwarmEvent::ConnectionEstablished { peer_id, endpoint, .. } => {
                tracing::info!(peer = %peer_id, addr = %endpoint.get_remote_address(), "peer connected");
                self.peers.entry(peer_id).or_insert(PeerState {
                    role: None,
                    in_flight: 0,
                    bps: None,
                    hits: 0,
                    misses: 0,
                });
                self.drain_queue();
            }
            SwarmEvent::ConnectionClosed { peer_id, num_established: 0, .. } => {
                tracing::info!(peer = %peer_id, "peer disconnected");
                self.peers.remove(&peer_id);
                // Requests pending with it fail through OutboundFailure; queued ones may now
                // have no candidate left.
                self.drain_queue();
            }
            SwarmEvent::ConnectionClosed { .. } => {}
            SwarmEvent::NewListenAddr { address, .. } => {
                tracing::info!(%address, "listening");
                self.listen_addrs.push(address);
            }
            SwarmEvent::ExpiredListenAddr { address, .. } => self.listen_addrs.retain(|a| a != &address),
            SwarmEvent::OutgoingConnectionError { peer_id, error, .. } => {
                tracing::debug!(peer = ?peer_id, %error, "outgoing connection failed");
            }
            SwarmEvent::IncomingConnectionError { error, .. } => tracing::debug!(%error, "incoming connection failed"),
            SwarmEvent::ListenerError { error, .. } => tracing::warn!(%error, "listener error"),
            SwarmEvent::ListenerClosed { addresses, .. } => self.listen_addrs.retain(|a| !addresses.contains(a)),
            // Dialing, IncomingConnection, NewExternalAddrCandidate, external address
            // confirmations: nothing to act on.
            _ => {}
        }
    }

    fn chunk_event(&mut self, ev: request_response::Event<ChunkRequest, ChunkResponse>) {
        use request_response::{Event, Message};
        match ev {
            Event::Message { peer, message: Message::Request { request, channel, .. }, .. } => {
                if self.banned.contains_key(&peer) {
                    return;
                }
                let of_peer = self.uploads_by_peer.get(&peer).copied().unwrap_or(0);
                if self.uploads >= self.config.max_uploads
                    || of_peer >= self.config.max_uploads_per_peer
                    || !self.upload_budget_left()
                {
                    self.counters.busy.fetch_add(1, Ordering::Relaxed);
                    let _ = self.swarm.behaviour_mut().chunks.send_response(channel, ChunkResponse::Busy);
                    return;
                }
                self.uploads += 1;
                *self.uploads_by_peer.entry(peer).or_default() += 1;
                let (provider, tx) = (self.provider.clone(), self.served_tx.clone());
                tokio::spawn(async move {
                    let found = tokio::task::spawn_blocking(move || provider.object(&request.id, request.len))
                        .await
                        .ok()
                        .flatten();
                    let response = found.map_or(ChunkResponse::NotFound, ChunkResponse::Object);
                    let _ = tx.send((peer, channel, response)).await;
                });
            }
            Event::Message { message: Message::Response { request_id, response }, .. } => {
                self.finish(request_id, Answer::Response(response));
            }
            Event::OutboundFailure { peer, request_id, error, .. } => {
                tracing::debug!(%peer, %error, "chunk request failed");
                self.finish(request_id, Answer::Failed);
            }
            Event::InboundFailure { peer, error, .. } => tracing::debug!(%peer, %error, "serving a chunk failed"),
            Event::ResponseSent { .. } => {}
        }
    }

    /// Refills the upload bucket and says whether anything is left in it.
    fn upload_budget_left(&mut self) -> bool {
        let Some(rate) = self.config.max_upload_rate else { return true };
        let rate = rate as f64;
        let now = Instant::now();
        let refill = now.duration_since(self.budget_at).as_secs_f64() * rate;
        self.budget_at = now;
        self.upload_budget = (self.upload_budget + refill).min(rate);
        self.upload_budget > 0.0
    }

    fn gossip_event(&mut self, ev: gossipsub::Event) {
        let gossipsub::Event::Message { propagation_source, message_id, message } = ev else { return };
        let verdict = match &self.config.trust_root {
            Some(root) => match flotilla_core::manifest::verify_signed(&message.data, root, Timestamp::now()) {
                Ok(m) => {
                    let man = m.manifest();
                    tracing::info!(product = %man.product, version = %man.version, "signed release announced");
                    let _ = self.announcements.send(m);
                    gossipsub::MessageAcceptance::Accept
                }
                Err(e) => {
                    tracing::warn!(peer = %propagation_source, error = %e, "announcement refused");
                    gossipsub::MessageAcceptance::Reject
                }
            },
            // Without a trust root nothing can be checked: do not relay it either.
            None => gossipsub::MessageAcceptance::Ignore,
        };
        self.swarm.behaviour_mut().gossipsub.report_message_validation_result(
            &message_id,
            &propagation_source,
            verdict,
        );
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use flotilla_core::object;

    use super::*;

    /// Serves what it holds; optionally corrupts every object.
    struct Memory {
        chunks: Mutex<HashMap<ChunkId, Vec<u8>>>,
        corrupt: bool,
    }

    impl ChunkProvider for Memory {
        fn object(&self, id: &ChunkId, _: u32) -> Option<Vec<u8>> {
            let mut obj = self.chunks.lock().unwrap().get(id).cloned()?;
            if self.corrupt {
                *obj.last_mut().unwrap() ^= 1;
            }
            Some(obj)
        }
    }

    fn loopback(role: Role) -> MeshConfig {
        let mut c = MeshConfig::new(role);
        c.listen = vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()];
        c.mdns = false;
        c
    }

    async fn server(data: &[u8], corrupt: bool) -> Mesh {
        let id = ChunkId::of(data);
        let chunks = Mutex::new(HashMap::from([(id, object::encode(data, 1))]));
        Mesh::start(loopback(Role::Cache), Arc::new(Memory { chunks, corrupt })).await.unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn fetches_verified_chunks_and_bans_a_corrupting_peer() {
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let id = ChunkId::of(&data);
        let len = data.len() as u32;
        let good = server(&data, false).await;
        let bad = server(&data, true).await;

        let mut config = loopback(Role::Agent);
        config.bootstrap = vec![bad.listen_addrs().await.unwrap()[0].clone()];
        let client = Mesh::start(config, Arc::new(crate::store::NoChunks)).await.unwrap();
        client.wait_for_peers(1, Duration::from_secs(10)).await.unwrap();

        // Only the corrupting peer: nothing verified comes back, and it is banned.
        let e = client.fetch(id, len).await.unwrap_err();
        assert!(matches!(e, MeshError::NotFound { asked: 1, .. }), "{e}");
        let stats = client.stats().await.unwrap();
        assert_eq!((stats.bans, stats.bad_chunks, stats.peers), (1, 1, 0));

        // Add the honest one through a second node bootstrapped to it.
        let mut config = loopback(Role::Agent);
        config.bootstrap = vec![good.listen_addrs().await.unwrap()[0].clone()];
        let client = Mesh::start(config, Arc::new(crate::store::NoChunks)).await.unwrap();
        client.wait_for_peers(1, Duration::from_secs(10)).await.unwrap();
        let got = client.fetch(id, len).await.unwrap();
        assert_eq!(got.data, data);
        assert_eq!(got.peer, good.peer_id());
        assert_eq!(good.stats().await.unwrap().served_chunks, 1);

        // Unknown chunks are not found, after asking the one peer.
        let e = client.fetch(ChunkId::of(b"nobody has this"), 15).await.unwrap_err();
        assert!(matches!(e, MeshError::NotFound { asked: 1, .. }), "{e}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_upload_budget_spent_answers_busy() {
        let data: Vec<u8> = (0..50_000u32).map(|i| (i % 253) as u8).collect();
        let (id, len) = (ChunkId::of(&data), data.len() as u32);
        let chunks = Mutex::new(HashMap::from([(id, object::encode(&data, 1))]));
        let mut config = loopback(Role::Cache);
        // One byte per second: the first chunk spends the budget for hours.
        config.max_upload_rate = Some(1);
        let server = Mesh::start(config, Arc::new(Memory { chunks, corrupt: false })).await.unwrap();
        let mut config = loopback(Role::Agent);
        config.bootstrap = vec![server.listen_addrs().await.unwrap()[0].clone()];
        let client = Mesh::start(config, Arc::new(crate::store::NoChunks)).await.unwrap();
        client.wait_for_peers(1, Duration::from_secs(10)).await.unwrap();
        assert_eq!(client.fetch(id, len).await.unwrap().data, data);
        assert!(matches!(client.fetch(id, len).await, Err(MeshError::NotFound { asked: 1, .. })));
        let stats = server.stats().await.unwrap();
        assert_eq!((stats.served_chunks, stats.busy), (1, 1));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn announcements_are_verified_before_delivery() {
        let a = Mesh::start(loopback(Role::Cache), Arc::new(crate::store::NoChunks)).await.unwrap();
        let mut config = loopback(Role::Agent);
        config.bootstrap = vec![a.listen_addrs().await.unwrap()[0].clone()];
        let b = Mesh::start(config, Arc::new(crate::store::NoChunks)).await.unwrap();
        b.wait_for_peers(1, Duration::from_secs(10)).await.unwrap();
        let mut rx = b.announcements();
        // Gossipsub needs the subscription exchange before a publish finds a peer.
        let deadline = Instant::now() + Duration::from_secs(10);
        while a.announce(b"not a signed manifest".to_vec()).await.is_err() {
            assert!(Instant::now() < deadline, "no subscriber appeared");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // b has no trust root: nothing is delivered.
        assert!(tokio::time::timeout(Duration::from_millis(300), rx.recv()).await.is_err());
    }
}
