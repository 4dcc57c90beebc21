//! The actor that owns the libp2p swarm: connections, bans, serving, request scheduling
//! and announcements. Only [`super::Mesh`] talks to it, through [`super::Command`]s.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use flotilla_core::manifest::VerifiedManifest;
use flotilla_core::time::Timestamp;
use futures::StreamExt as _;
use libp2p::multiaddr::Protocol;
use libp2p::request_response::{self, OutboundRequestId, ProtocolSupport, ResponseChannel};
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{
    Multiaddr, PeerId, StreamProtocol, Swarm, Transport as _, allow_block_list, connection_limits, gossipsub, identify,
    identity, kad, mdns,
};
use tokio::sync::{broadcast, mpsc, oneshot};

use super::pipe::{Pipe, PipeAnswer, PipeAsk, PipeEvent};
use super::{
    Answer, Command, Counters, EXCHANGE_LAPSE, IDENTIFY_PROTOCOL, KAD_PROTOCOL, MAX_ANNOUNCEMENT_LEN,
    MAX_IN_FLIGHT_BYTES, MAX_IN_FLIGHT_PER_PEER, MAX_PROVIDERS_DIALLED, MeshConfig, MeshError, PROVIDER_LOOKUP_EVERY,
    PeerInfo, RUN_BYTES, Role, TICK, UNMEASURED_BPS,
};
use crate::offer::VerifiedOffer;
use crate::protocol::{
    ChunkCodec, ChunkRequest, ChunkResponse, ChunkWant, MAX_RUN_CHUNKS, PIPE_PROTOCOL, PROTOCOL, RELEASE_PROTOCOL,
    ReleaseAsk, ReleaseCodec, ReleaseRequest, ReleaseResponse,
};
use crate::store::ChunkProvider;

/// What [`spawn`] needs from [`super::Mesh::start`].
pub(super) struct Parts {
    pub(super) swarm: Swarm<Behaviour>,
    pub(super) rx: mpsc::Receiver<Command>,
    pub(super) config: MeshConfig,
    pub(super) provider: Arc<dyn ChunkProvider>,
    pub(super) counters: Arc<Counters>,
    pub(super) announcements: broadcast::Sender<VerifiedManifest>,
    pub(super) topic: gossipsub::IdentTopic,
    pub(super) offers: broadcast::Sender<VerifiedOffer>,
    pub(super) offers_topic: gossipsub::IdentTopic,
    pub(super) listen_addrs: Vec<Multiaddr>,
}

/// Dials the bootstrap peers and runs the actor until every handle is dropped.
pub(super) fn spawn(p: Parts) {
    let (served_tx, served_rx) = mpsc::channel(64);
    let (pipe_tx, pipe_rx) = mpsc::unbounded_channel();
    let control = p.swarm.behaviour().pipes.new_control();
    if p.config.pipes {
        super::pipe::accept(control.clone(), pipe_tx.clone());
    }
    let upload_budget = p.config.max_upload_rate.map_or(0.0, |r| r as f64);
    let mut actor = MeshActor {
        swarm: p.swarm,
        rx: p.rx,
        config: p.config,
        provider: p.provider,
        counters: p.counters,
        announcements: p.announcements,
        topic: p.topic,
        offers: p.offers,
        offers_topic: p.offers_topic,
        listen_addrs: p.listen_addrs,
        release_pending: HashMap::new(),
        tracked: None,
        provided: HashSet::new(),
        routing_changed: false,
        last_lookup: None,
        peers: HashMap::new(),
        discovered: HashMap::new(),
        banned: HashMap::new(),
        pending: HashMap::new(),
        open: HashMap::new(),
        in_flight_bytes: 0,
        queue: VecDeque::new(),
        uploads: 0,
        uploads_by_peer: HashMap::new(),
        waiting: VecDeque::new(),
        upload_budget,
        budget_at: Instant::now(),
        served_tx,
        served_rx,
        control,
        pipes: HashMap::new(),
        pipe_tx,
        pipe_rx,
        next_pipe_id: 0,
    };
    for addr in actor.config.bootstrap.clone() {
        // Bootstrap peers seed Kademlia's routing table too.
        if let (Some(kad), Some(Protocol::P2p(peer))) = (actor.swarm.behaviour_mut().kad.as_mut(), addr.iter().last()) {
            let plain: Multiaddr = addr.iter().filter(|p| !matches!(p, Protocol::P2p(_))).collect();
            kad.add_address(&peer, plain);
        }
        actor.dial(addr);
    }
    tokio::spawn(async move { actor.run().await });
}

#[derive(NetworkBehaviour)]
pub(super) struct Behaviour {
    limits: connection_limits::Behaviour,
    blocked: allow_block_list::Behaviour<allow_block_list::BlockedPeers>,
    identify: identify::Behaviour,
    mdns: Toggle<mdns::tokio::Behaviour>,
    kad: Toggle<kad::Behaviour<kad::store::MemoryStore>>,
    pub(super) gossipsub: gossipsub::Behaviour,
    chunks: request_response::Behaviour<ChunkCodec>,
    pipes: libp2p_stream::Behaviour,
    release: request_response::Behaviour<ReleaseCodec>,
}

/// Builds the swarm: TCP (inside the fleet-private network when a pre-shared key is set) and,
/// without a key, QUIC; then the behaviours.
pub(super) fn build_swarm(config: &MeshConfig, key: identity::Keypair) -> Result<Swarm<Behaviour>, MeshError> {
    let start = |e: &dyn std::fmt::Display| MeshError::Start(e.to_string());
    let tcp = || libp2p::tcp::Config::default().nodelay(true);
    // Peers stay connected between releases so have-state and gossip keep flowing.
    let swarm_config = |c: libp2p::swarm::Config| c.with_idle_connection_timeout(Duration::from_secs(300));
    let builder = libp2p::SwarmBuilder::with_existing_identity(key).with_tokio();
    let swarm = match config.psk {
        // pnet wraps the raw TCP stream before Noise; QUIC brings its own TLS and cannot be
        // wrapped, so a private network has no QUIC (MeshConfig::validate refuses the addresses).
        Some(psk) => builder
            .with_other_transport(|key| -> Result<_, Box<dyn std::error::Error + Send + Sync>> {
                Ok(libp2p::tcp::tokio::Transport::new(tcp())
                    .and_then(move |socket, _| libp2p::pnet::PnetConfig::new(psk).handshake(socket))
                    .upgrade(libp2p::core::upgrade::Version::V1Lazy)
                    .authenticate(libp2p::noise::Config::new(key)?)
                    .multiplex(libp2p::yamux::Config::default()))
            })
            .map_err(|e| start(&e))?
            .with_behaviour(|key| behaviour(config, key))
            .map_err(|e| start(&e))?
            .with_swarm_config(swarm_config)
            .build(),
        None => builder
            .with_tcp(tcp(), libp2p::noise::Config::new, libp2p::yamux::Config::default)
            .map_err(|e| start(&e))?
            .with_quic()
            .with_behaviour(|key| behaviour(config, key))
            .map_err(|e| start(&e))?
            .with_swarm_config(swarm_config)
            .build(),
    };
    Ok(swarm)
}

fn behaviour(
    config: &MeshConfig,
    key: &identity::Keypair,
) -> Result<Behaviour, Box<dyn std::error::Error + Send + Sync>> {
    let peer_id = key.public().to_peer_id();
    let limits = connection_limits::ConnectionLimits::default()
        .with_max_established(Some(config.max_connections))
        .with_max_established_per_peer(Some(2))
        .with_max_pending_incoming(Some(config.max_connections));
    let gossip_config = gossipsub::ConfigBuilder::default()
        .max_transmit_size(MAX_ANNOUNCEMENT_LEN)
        .validation_mode(gossipsub::ValidationMode::Strict)
        .validate_messages()
        .build()
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    let gossipsub = gossipsub::Behaviour::new(gossipsub::MessageAuthenticity::Signed(key.clone()), gossip_config)
        .map_err(std::io::Error::other)?;
    let mdns = if config.mdns { Some(mdns::tokio::Behaviour::new(mdns::Config::default(), peer_id)?) } else { None };
    let kad = config.kademlia.then(|| {
        let mut kad = kad::Behaviour::with_config(
            peer_id,
            kad::store::MemoryStore::new(peer_id),
            kad::Config::new(StreamProtocol::new(KAD_PROTOCOL)),
        );
        // On a LAN no external address is ever confirmed, so Kademlia would stay a client
        // (DESIGN.md): every node answers queries.
        kad.set_mode(Some(kad::Mode::Server));
        kad
    });
    let request_timeout = config.request_timeout;
    Ok(Behaviour {
        limits: connection_limits::Behaviour::new(limits),
        blocked: allow_block_list::Behaviour::default(),
        identify: identify::Behaviour::new(
            identify::Config::new(IDENTIFY_PROTOCOL.into(), key.public())
                .with_agent_version(config.role.agent_version()),
        ),
        mdns: mdns.into(),
        kad: kad.into(),
        gossipsub,
        chunks: request_response::Behaviour::with_codec(
            ChunkCodec,
            [(PROTOCOL, ProtocolSupport::Full)],
            request_response::Config::default().with_request_timeout(request_timeout).with_max_concurrent_streams(64),
        ),
        pipes: libp2p_stream::Behaviour::new(),
        release: request_response::Behaviour::with_codec(
            ReleaseCodec,
            [(RELEASE_PROTOCOL, ProtocolSupport::Full)],
            request_response::Config::default().with_request_timeout(request_timeout).with_max_concurrent_streams(16),
        ),
    })
}

/// The Kademlia key of a release: one provider record per release, not per chunk.
fn release_key(index: &flotilla_core::ids::IndexId) -> kad::RecordKey {
    let mut key = b"flotilla/release/".to_vec();
    key.extend_from_slice(index.as_bytes());
    kad::RecordKey::new(&key)
}

#[derive(Debug)]
struct PeerState {
    role: Option<Role>,
    in_flight: usize,
    /// Smoothed delivery rate, bytes per second.
    bps: Option<f64>,
    hits: u64,
    misses: u64,
    /// An exchange of have-maps with it failed: it predates them, and is asked plainly.
    no_exchange: bool,
    /// It takes chunk pipes (identify lists [`PIPE_PROTOCOL`]): asked on one, else with a
    /// stream per request.
    pipe: bool,
}

impl PeerState {
    /// Higher is better: expected rate, discounted by how often it lacks chunks and by
    /// `load`, the requests it has in flight.
    fn score(&self, load: usize) -> f64 {
        let hit_rate = (self.hits as f64 + 1.0) / ((self.hits + self.misses) as f64 + 2.0);
        // Caches hold whole releases: prefer them when nothing is measured yet.
        let cache = if self.role == Some(Role::Cache) { 2.0 } else { 1.0 };
        self.bps.unwrap_or(UNMEASURED_BPS) * hit_rate * cache / (load as f64 + 1.0)
    }
}

/// Where the answer about one chunk goes.
type Reply = oneshot::Sender<Option<(PeerId, Answer)>>;

/// A chunk in a request, with who waits for it.
struct Item {
    want: ChunkWant,
    reply: Reply,
}

/// How a request went out: on the request-response protocol, or on a pipe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Sent {
    Stream(OutboundRequestId),
    Pipe(u64),
}

/// Where the answer to a peer's request goes.
enum Channel {
    Stream(ResponseChannel<ChunkResponse>),
    Pipe(oneshot::Sender<ChunkResponse>),
}

/// A request sent: the chunks of one run, in order.
struct Pending {
    peer: PeerId,
    started: Instant,
    items: Vec<Item>,
}

impl Pending {
    fn bytes(&self) -> u64 {
        self.items.iter().map(|i| u64::from(i.want.len)).sum()
    }
}

struct Queued {
    want: ChunkWant,
    exclude: HashSet<PeerId>,
    /// An end-game duplicate: not sent to a peer already asked for the same chunk.
    duplicate: bool,
    reply: Reply,
}

struct MeshActor {
    swarm: Swarm<Behaviour>,
    rx: mpsc::Receiver<Command>,
    config: MeshConfig,
    provider: Arc<dyn ChunkProvider>,
    counters: Arc<Counters>,
    announcements: broadcast::Sender<VerifiedManifest>,
    topic: gossipsub::IdentTopic,
    offers: broadcast::Sender<VerifiedOffer>,
    offers_topic: gossipsub::IdentTopic,
    listen_addrs: Vec<Multiaddr>,
    release_pending: HashMap<Sent, ReleaseWait>,
    /// The release this node is fetching, with its peers' have-maps.
    tracked: Option<Tracked>,
    /// Releases this node announced as a Kademlia provider of.
    provided: HashSet<flotilla_core::ids::IndexId>,
    /// New peers entered the routing table since provider records were last published.
    routing_changed: bool,
    /// When the tracked release's providers were last looked up.
    last_lookup: Option<Instant>,
    peers: HashMap<PeerId, PeerState>,
    /// Peers mDNS found, dialled again every tick while not connected: one failed dial
    /// (a link not up yet, say) must not leave two hosts of a LAN apart until mDNS asks again
    /// minutes later.
    discovered: HashMap<PeerId, Multiaddr>,
    banned: HashMap<PeerId, Instant>,
    pending: HashMap<Sent, Pending>,
    /// Runs being gathered this turn, per peer; sent by [`MeshActor::flush`] when the turn
    /// ends (each counts as one of the peer's requests in flight from when it opens).
    open: HashMap<PeerId, Vec<Item>>,
    /// Chunk bytes of `pending` and `open`.
    in_flight_bytes: u64,
    /// Requests waiting for a free slot at a peer that may hold them.
    queue: VecDeque<Queued>,
    uploads: usize,
    uploads_by_peer: HashMap<PeerId, usize>,
    /// Requests waiting for an upload slot.
    waiting: VecDeque<(PeerId, ChunkRequest, Channel)>,
    /// Token bucket of [`MeshConfig::max_upload_rate`], in bytes; refilled when read.
    upload_budget: f64,
    budget_at: Instant,
    served_tx: mpsc::Sender<Served>,
    served_rx: mpsc::Receiver<Served>,
    /// Opens pipes.
    control: libp2p_stream::Control,
    /// The pipe to each peer asked on one.
    pipes: HashMap<PeerId, Pipe>,
    /// What pipes tell the actor: answers, and peers' requests.
    pipe_tx: mpsc::UnboundedSender<PipeEvent>,
    pipe_rx: mpsc::UnboundedReceiver<PipeEvent>,
    next_pipe_id: u64,
}

/// A finished read of the provider, to answer on the swarm.
type Served = (PeerId, Channel, ChunkResponse);

/// Requests that may wait for an upload slot, per slot ([`MeshConfig::max_uploads`]); past
/// that, peers are told `Busy`.
const WAITING_PER_UPLOAD: usize = 4;

/// How long the have-map of a peer that holds every chunk is trusted before it is asked again.
const COMPLETE_RECHECK: Duration = Duration::from_secs(30);

/// Commands handled in one turn at most before the runs gathered are sent.
const COMMANDS_PER_TURN: usize = 256;
/// Where the answer to a release request goes: the peer asked and its answer (`None`: failed).
pub(super) type ReleaseReply = oneshot::Sender<(PeerId, Option<ReleaseResponse>)>;

/// Who waits for a release answer: a caller, or the actor's own have-map refresh.
enum ReleaseWait {
    Caller(ReleaseReply),
    /// A have-map asked for (`exchange`: with this node's own in the request).
    HaveMap {
        index: flotilla_core::ids::IndexId,
        exchange: bool,
    },
}

/// The release being fetched: where each chunk sits in its index, and which peer holds what.
pub(super) struct Tracked {
    pub(super) index: flotilla_core::ids::IndexId,
    /// Chunk → its first entry in the index (the bit that says a peer holds it).
    pub(super) entries: HashMap<flotilla_core::ids::ChunkId, usize>,
    /// Bytes of a have-map over the index.
    pub(super) map_len: u32,
    /// Entries in the index (bits of a have-map that mean something).
    len: usize,
    haves: HashMap<PeerId, Vec<u8>>,
    /// Peers asked for their have-map and not answered yet: never asked twice at once.
    asked: HashSet<PeerId>,
    /// Peers whose last have-map holds every chunk: asked again only after [`COMPLETE_RECHECK`].
    complete: HashSet<PeerId>,
    /// When each peer's have-map last arrived (in an answer or in its own exchange).
    updated: HashMap<PeerId, Instant>,
}

impl Tracked {
    /// Builds the tracking state of `index`.
    pub(super) fn new(index: &flotilla_core::index::ChunkIndex) -> Self {
        let mut entries = HashMap::new();
        for (i, e) in index.entries().iter().enumerate() {
            entries.entry(e.id).or_insert(i);
        }
        let map_len = u32::try_from(index.len().div_ceil(8).max(1)).unwrap_or(u32::MAX);
        Self {
            index: index.id(),
            entries,
            map_len,
            len: index.len(),
            haves: HashMap::new(),
            asked: HashSet::new(),
            complete: HashSet::new(),
            updated: HashMap::new(),
        }
    }

    /// Keeps `peer`'s have-map.
    fn set_haves(&mut self, peer: PeerId, bits: Vec<u8>) {
        self.updated.insert(peer, Instant::now());
        if (0..self.len).all(|i| bits.get(i / 8).is_some_and(|b| b >> (i % 8) & 1 == 1)) {
            self.complete.insert(peer);
        } else {
            self.complete.remove(&peer);
        }
        self.haves.insert(peer, bits);
    }

    /// Forgets what is known of `peer` (it left).
    fn forget(&mut self, peer: &PeerId) {
        self.haves.remove(peer);
        self.asked.remove(peer);
        self.complete.remove(peer);
        self.updated.remove(peer);
    }

    /// Whether `peer` holds `chunk` by its last have-map; `None` when unknown.
    fn holds(&self, peer: &PeerId, chunk: &flotilla_core::ids::ChunkId) -> Option<bool> {
        let pos = *self.entries.get(chunk)?;
        let bits = self.haves.get(peer)?;
        Some(bits.get(pos / 8).is_some_and(|b| b >> (pos % 8) & 1 == 1))
    }
}

/// Whether an address a peer reports can be dialled by others (not `0.0.0.0` or `::`).
fn is_dialable(addr: &Multiaddr) -> bool {
    addr.iter().all(|p| match p {
        Protocol::Ip4(ip) => !ip.is_unspecified(),
        Protocol::Ip6(ip) => !ip.is_unspecified(),
        _ => true,
    })
}

impl MeshActor {
    async fn run(&mut self) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                cmd = self.rx.recv() => match cmd {
                    Some(cmd) => {
                        self.command(cmd);
                        // Commands sent together (a run of fetches) are handled together, so
                        // their chunks can share requests.
                        for _ in 1..COMMANDS_PER_TURN {
                            let Ok(cmd) = self.rx.try_recv() else { break };
                            self.command(cmd);
                        }
                    }
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
                    self.serve_waiting();
                    if let ChunkResponse::Run(objects) = &response {
                        let bytes: usize = objects.iter().flatten().map(Vec::len).sum();
                        self.upload_budget -= bytes as f64;
                        self.counters.served_chunks.fetch_add(objects.iter().flatten().count() as u64, Ordering::Relaxed);
                        self.counters.served_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
                        self.counters.served_requests.fetch_add(1, Ordering::Relaxed);
                    }
                    self.respond(channel, response);
                }
                Some(ev) = self.pipe_rx.recv() => self.pipe_event(ev),
                ev = self.swarm.select_next_some() => self.swarm_event(ev),
                _ = tick.tick() => self.tick(),
            }
            self.flush();
        }
        tracing::debug!("mesh node stopped");
    }

    /// Dials `addr` unless its peer (`/p2p/...`) is connected, banned or already being dialled
    /// (bootstrap peers and mDNS finds are dialled again every tick while not connected).
    fn dial(&mut self, addr: Multiaddr) {
        let peer = addr.iter().find_map(|p| match p {
            Protocol::P2p(id) => Some(id),
            _ => None,
        });
        if peer.is_some_and(|p| self.peers.contains_key(&p) || self.banned.contains_key(&p)) {
            return;
        }
        let opts = match peer {
            Some(peer) => DialOpts::peer_id(peer)
                .addresses(vec![addr.clone()])
                .condition(PeerCondition::DisconnectedAndNotDialing)
                .build(),
            None => DialOpts::from(addr.clone()),
        };
        if let Err(e) = self.swarm.dial(opts) {
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
        let found: Vec<Multiaddr> =
            self.discovered.iter().map(|(peer, addr)| addr.clone().with(Protocol::P2p(*peer))).collect();
        for addr in found {
            self.dial(addr);
        }
        self.refresh_haves();
        self.kademlia_tick();
    }

    /// Publishes this node's provider records again when new peers joined the routing table
    /// (a record published with no peer around reached nobody), and looks the tracked
    /// release's providers up again every [`PROVIDER_LOOKUP_EVERY`] or when the table grew.
    fn kademlia_tick(&mut self) {
        let changed = std::mem::take(&mut self.routing_changed);
        if changed {
            for index in self.provided.clone() {
                self.provide(index);
            }
        }
        let due = self.last_lookup.is_none_or(|t| t.elapsed() >= PROVIDER_LOOKUP_EVERY);
        if let Some(t) = &self.tracked
            && (changed || due)
        {
            let index = t.index;
            self.lookup_providers(index);
        }
    }

    fn provide(&mut self, index: flotilla_core::ids::IndexId) {
        let Some(kad) = self.swarm.behaviour_mut().kad.as_mut() else { return };
        self.provided.insert(index);
        if let Err(e) = kad.start_providing(release_key(&index)) {
            tracing::warn!(%index, error = %e, "cannot provide the release on Kademlia");
        }
    }

    fn lookup_providers(&mut self, index: flotilla_core::ids::IndexId) {
        let Some(kad) = self.swarm.behaviour_mut().kad.as_mut() else { return };
        kad.get_providers(release_key(&index));
        self.last_lookup = Some(Instant::now());
    }

    fn kad_event(&mut self, ev: kad::Event) {
        match ev {
            kad::Event::OutboundQueryProgressed {
                result: kad::QueryResult::GetProviders(Ok(kad::GetProvidersOk::FoundProviders { providers, .. })),
                ..
            } => {
                let local = *self.swarm.local_peer_id();
                // Dialled while the query still knows their addresses. Records are unverified
                // (anyone can claim a release), hence the bound; what they serve is verified.
                let new: Vec<PeerId> = providers
                    .into_iter()
                    .filter(|p| *p != local && !self.peers.contains_key(p) && !self.banned.contains_key(p))
                    .take(MAX_PROVIDERS_DIALLED)
                    .collect();
                for peer in new {
                    tracing::debug!(%peer, "dialling a provider of the tracked release");
                    let opts = DialOpts::peer_id(peer).condition(PeerCondition::DisconnectedAndNotDialing).build();
                    if let Err(e) = self.swarm.dial(opts) {
                        tracing::debug!(%peer, error = %e, "dialling a provider failed");
                    }
                }
            }
            kad::Event::RoutingUpdated { is_new_peer: true, peer, .. } => {
                tracing::debug!(%peer, "new peer in the Kademlia routing table");
                self.routing_changed = true;
            }
            _ => {}
        }
    }

    /// Asks the connected peers for their have-maps of the tracked release: each peer at most
    /// once at a time, and a peer whose last map held every chunk only every
    /// [`COMPLETE_RECHECK`]. Two peers that both
    /// track it exchange maps in one round trip that the one with the lower id starts; the
    /// other asks only when no exchange reached it for [`EXCHANGE_LAPSE`] (the peer predates
    /// exchanges, tracks another release, or is slow). Half the requests of each asking the
    /// other, for maps as fresh.
    fn refresh_haves(&mut self) {
        let Some(t) = &self.tracked else { return };
        let (index, max_len) = (t.index, t.map_len);
        let me = *self.swarm.local_peer_id();
        let now = Instant::now();
        let due: Vec<(PeerId, bool)> = self
            .peers
            .iter()
            .filter(|(p, _)| !self.banned.contains_key(p) && !t.asked.contains(p))
            .filter_map(|(p, s)| {
                let age = t.updated.get(p).map(|at| now.duration_since(*at));
                // A complete peer (a cache, say) is asked again now and then: a cache's store
                // may drop chunks.
                if t.complete.contains(p) && age.is_some_and(|a| a < COMPLETE_RECHECK) {
                    return None;
                }
                let exchange = !s.no_exchange;
                let leads = !exchange || me < *p;
                let lapsed = age.is_none_or(|a| a >= EXCHANGE_LAPSE);
                (leads || lapsed).then_some((*p, exchange))
            })
            .collect();
        let mine = due
            .iter()
            .any(|(_, exchange)| *exchange)
            .then(|| self.provider.have_map(&index))
            .flatten()
            .filter(|m| !m.is_empty() && m.len() == max_len as usize);
        for (peer, exchange) in due {
            let ask = match &mine {
                Some(m) if exchange => ReleaseAsk::Exchange(m.clone()),
                _ => ReleaseAsk::HaveMap,
            };
            self.ask_haves(peer, ask, index, max_len);
        }
    }

    fn ask_haves(&mut self, peer: PeerId, ask: ReleaseAsk, index: flotilla_core::ids::IndexId, max_len: u32) {
        let exchange = matches!(ask, ReleaseAsk::Exchange(_));
        let req = ReleaseRequest { ask, index, max_len };
        let id = self.send(peer, PipeAsk::Release(req));
        self.release_pending.insert(id, ReleaseWait::HaveMap { index, exchange });
        self.counters.have_requests.fetch_add(1, Ordering::Relaxed);
        if let Some(t) = self.tracked.as_mut() {
            t.asked.insert(peer);
        }
    }

    fn command(&mut self, cmd: Command) {
        match cmd {
            Command::Request { want, exclude, duplicate, reply } => {
                self.request(Queued { want, exclude, duplicate, reply })
            }
            Command::Ban { peer } => self.ban(peer),
            Command::Peers { reply } => {
                let list = self
                    .peers
                    .iter()
                    .filter(|(p, _)| !self.banned.contains_key(p))
                    .map(|(p, s)| PeerInfo {
                        id: *p,
                        role: s.role,
                        have_map: self.tracked.as_ref().is_some_and(|t| t.haves.contains_key(p)),
                    })
                    .collect();
                let _ = reply.send(list);
            }
            Command::ListenAddrs { reply } => {
                let _ = reply.send(self.listen_addrs.clone());
            }
            Command::Announce { envelope, offer, reply } => {
                let topic = if offer { self.offers_topic.clone() } else { self.topic.clone() };
                let r = self
                    .swarm
                    .behaviour_mut()
                    .gossipsub
                    .publish(topic, envelope)
                    .map(|_| ())
                    .map_err(|e| MeshError::Announce(e.to_string()));
                let _ = reply.send(r);
            }
            Command::Track { release } => {
                let index = release.as_ref().map(|t| t.index);
                self.tracked = release;
                self.refresh_haves();
                if let Some(index) = index {
                    // A node fetching a release serves what it has of it (have-maps tell what).
                    self.provide(index);
                    self.lookup_providers(index);
                }
            }
            Command::Provide { index } => self.provide(index),
            Command::Release { req, peer, reply } => {
                if self.banned.contains_key(&peer) || !self.peers.contains_key(&peer) {
                    let _ = reply.send((peer, None));
                    return;
                }
                // On a stream of its own: an index may be megabytes, and would hold up the pipe.
                let id = self.swarm.behaviour_mut().release.send_request(&peer, req);
                self.release_pending.insert(Sent::Stream(id), ReleaseWait::Caller(reply));
            }
        }
    }

    fn ban(&mut self, peer: PeerId) {
        if self.banned.insert(peer, Instant::now() + self.config.ban_for).is_none() {
            self.counters.bans.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%peer, for_s = self.config.ban_for.as_secs(), "peer banned");
        }
        self.swarm.behaviour_mut().blocked.block_peer(peer);
        self.pipes.remove(&peer);
        let _ = self.swarm.disconnect_peer_id(peer);
    }

    /// Adds `q` to a run for the best free peer, queues it while every candidate is at its
    /// limit, or answers `None` when there is no candidate at all.
    fn request(&mut self, q: Queued) {
        let id = q.want.id;
        // A duplicate (end-game) goes to a peer not already asked for the same chunk.
        let asked: HashSet<PeerId> = if q.duplicate {
            self.pending
                .values()
                .filter(|p| p.items.iter().any(|i| i.want.id == id))
                .map(|p| p.peer)
                .chain(self.open.iter().filter(|(_, items)| items.iter().any(|i| i.want.id == id)).map(|(p, _)| *p))
                .collect()
        } else {
            HashSet::new()
        };
        let all: Vec<(&PeerId, &PeerState)> = self
            .peers
            .iter()
            .filter(|(p, _)| !q.exclude.contains(p) && !self.banned.contains_key(p) && !asked.contains(p))
            .collect();
        let holds = |p: &PeerId| self.tracked.as_ref().and_then(|t| t.holds(p, &id));
        // Peers whose have-map lacks the chunk are not asked: when no peer holds it the
        // answer is "not found" at once, without a round of requests that all fail (the
        // caller asks again later, and maps are refreshed every second). Asking everyone
        // anyway made a site of waiting agents flood each other with requests.
        let candidates: Vec<(&PeerId, &PeerState)> =
            all.iter().filter(|(p, _)| holds(p) != Some(false)).copied().collect();
        if candidates.is_empty() {
            let _ = q.reply.send(None);
            return;
        }
        // A run being gathered for a peer may take more chunks even when the peer is at its
        // limit of requests in flight (the run counts as one of them from when it opened).
        let len = q.want.len;
        let open = &self.open;
        let joins = |p: &PeerId| {
            open.get(p).is_some_and(|items| {
                items.len() < MAX_RUN_CHUNKS
                    && items.iter().map(|i| u64::from(i.want.len)).sum::<u64>() + u64::from(len) <= u64::from(RUN_BYTES)
            })
        };
        // Known holders first, then the fastest.
        let best = candidates
            .iter()
            .filter(|(p, s)| joins(p) || s.in_flight < MAX_IN_FLIGHT_PER_PEER)
            .max_by(|a, b| {
                // Load counts runs being gathered too, so chunks asked for together still
                // spread over the peers that hold them.
                let score = |(p, s): &(&PeerId, &PeerState)| {
                    s.score(s.in_flight) * if holds(p) == Some(true) { 2.0 } else { 1.0 }
                };
                score(a).total_cmp(&score(b))
            })
            .map(|(p, _)| **p);
        let Some(peer) = best else {
            self.queue.push_back(q);
            return;
        };
        let joining = joins(&peer);
        // Answers held in memory stay bounded: past the budget, wait for answers to come in.
        if !joining && self.in_flight_bytes > 0 && self.in_flight_bytes + u64::from(len) > MAX_IN_FLIGHT_BYTES {
            self.queue.push_back(q);
            return;
        }
        if !joining && let Some(s) = self.peers.get_mut(&peer) {
            s.in_flight += 1;
        }
        self.in_flight_bytes += u64::from(len);
        self.open.entry(peer).or_default().push(Item { want: q.want, reply: q.reply });
    }

    /// Sends the runs gathered this turn, one request per peer.
    fn flush(&mut self) {
        for (peer, items) in std::mem::take(&mut self.open) {
            let wants = items.iter().map(|i| i.want).collect();
            match ChunkRequest::new(wants) {
                Ok(req) => {
                    let id = self.send(peer, PipeAsk::Chunks(req));
                    self.counters.requests.fetch_add(1, Ordering::Relaxed);
                    self.pending.insert(id, Pending { peer, started: Instant::now(), items });
                }
                Err(e) => {
                    // Only a chunk longer than any chunker makes gets here.
                    tracing::warn!(%peer, error = %e, "a request the protocol cannot carry");
                    self.in_flight_bytes -= items.iter().map(|i| u64::from(i.want.len)).sum::<u64>();
                    if let Some(s) = self.peers.get_mut(&peer) {
                        s.in_flight = s.in_flight.saturating_sub(1);
                    }
                    for i in items {
                        let _ = i.reply.send(Some((peer, Answer::Failed)));
                    }
                }
            }
        }
    }

    /// Retries queued requests after a peer freed a slot or left.
    fn drain_queue(&mut self) {
        let mut queued: Vec<Queued> = std::mem::take(&mut self.queue).into();
        // Rarest first: the chunks the fewest peers are known to hold get the free slots.
        if let Some(t) = &self.tracked {
            queued.sort_by_cached_key(|q| self.peers.keys().filter(|p| t.holds(p, &q.want.id) == Some(true)).count());
        }
        for q in queued {
            if !q.reply.is_closed() {
                self.request(q);
            }
        }
    }

    /// Starts serving waiting requests while upload slots are free, first come first served
    /// among peers under their own limit; a banned peer's requests are dropped unanswered.
    fn serve_waiting(&mut self) {
        let mut i = 0;
        while self.uploads < self.config.max_uploads && i < self.waiting.len() {
            let peer = self.waiting[i].0;
            if self.banned.contains_key(&peer) {
                self.waiting.remove(i);
                continue;
            }
            if self.uploads_by_peer.get(&peer).copied().unwrap_or(0) >= self.config.max_uploads_per_peer {
                i += 1;
                continue;
            }
            let Some((peer, request, channel)) = self.waiting.remove(i) else { break };
            self.uploads += 1;
            *self.uploads_by_peer.entry(peer).or_default() += 1;
            let (provider, tx) = (self.provider.clone(), self.served_tx.clone());
            tokio::spawn(async move {
                let n = request.wants().len();
                // One blocking call reads the whole run.
                let read = move || request.wants().iter().map(|w| provider.object(&w.id, w.len)).collect();
                let response = match tokio::task::spawn_blocking(read).await {
                    Ok(objects) => ChunkResponse::Run(objects),
                    Err(_) => ChunkResponse::Run(vec![None; n]),
                };
                let _ = tx.send((peer, channel, response)).await;
            });
        }
    }

    /// Sends `ask` to `peer`: on its pipe when it takes pipes (opened on first use, and again
    /// when it closed), else on a stream of its own.
    fn send(&mut self, peer: PeerId, ask: PipeAsk) -> Sent {
        match self.pipe_send(peer, ask) {
            Ok(id) => Sent::Pipe(id),
            Err(ask) => {
                let b = self.swarm.behaviour_mut();
                Sent::Stream(match ask {
                    PipeAsk::Chunks(req) => b.chunks.send_request(&peer, req),
                    PipeAsk::Release(req) => b.release.send_request(&peer, req),
                })
            }
        }
    }

    /// Sends `ask` on the pipe to `peer` (opened on first use, and again when it closed);
    /// gives it back when the peer takes no pipes.
    fn pipe_send(&mut self, peer: PeerId, ask: PipeAsk) -> Result<u64, PipeAsk> {
        if !self.config.pipes || !self.peers.get(&peer).is_some_and(|s| s.pipe) {
            return Err(ask);
        }
        let id = self.next_pipe_id;
        self.next_pipe_id += 1;
        let mut ask = ask;
        // A pipe that closed gives the request back; a new one takes it.
        for _ in 0..2 {
            let pipe = self.pipes.entry(peer).or_insert_with(|| {
                Pipe::open(self.control.clone(), peer, self.config.request_timeout, self.pipe_tx.clone())
            });
            match pipe.send(id, ask) {
                Ok(()) => {
                    self.counters.pipe_requests.fetch_add(1, Ordering::Relaxed);
                    return Ok(id);
                }
                Err(back) => {
                    self.pipes.remove(&peer);
                    ask = back;
                }
            }
        }
        Err(ask)
    }

    fn pipe_event(&mut self, ev: PipeEvent) {
        match ev {
            PipeEvent::Answer(peer, id, answer) => match answer {
                Some(PipeAnswer::Chunks(response)) => self.finish(Sent::Pipe(id), Some(response)),
                Some(PipeAnswer::Release(response)) => self.release_answer(peer, Sent::Pipe(id), response),
                None if self.pending.contains_key(&Sent::Pipe(id)) => self.finish(Sent::Pipe(id), None),
                None => self.release_failed(peer, Sent::Pipe(id)),
            },
            PipeEvent::Stalled(peer) => {
                tracing::info!(%peer, "peer did not answer in time; disconnecting");
                self.pipes.remove(&peer);
                let _ = self.swarm.disconnect_peer_id(peer);
            }
            PipeEvent::Unsupported(peer) => {
                tracing::debug!(%peer, "peer refused a chunk pipe; asking it with a stream per request");
                self.pipes.remove(&peer);
                if let Some(s) = self.peers.get_mut(&peer) {
                    s.pipe = false;
                }
            }
            PipeEvent::Request(peer, request, reply) => self.inbound(peer, request, Channel::Pipe(reply)),
            PipeEvent::Release(peer, request, reply) => {
                if let Some(response) = self.release_inbound(peer, request) {
                    let _ = reply.send(response);
                }
            }
        }
    }

    /// Answers a peer's request, on the protocol it came on (the asker may have gone).
    fn respond(&mut self, channel: Channel, response: ChunkResponse) {
        match channel {
            Channel::Stream(channel) => {
                let _ = self.swarm.behaviour_mut().chunks.send_response(channel, response);
            }
            Channel::Pipe(reply) => {
                let _ = reply.send(response);
            }
        }
    }

    /// A peer's request for chunks: served when an upload slot is free, else it waits for
    /// one; past the waiting room or the upload budget, the answer is `Busy`.
    fn inbound(&mut self, peer: PeerId, request: ChunkRequest, channel: Channel) {
        if self.banned.contains_key(&peer) {
            return;
        }
        if !self.upload_budget_left() || self.waiting.len() >= self.config.max_uploads * WAITING_PER_UPLOAD {
            self.counters.busy.fetch_add(1, Ordering::Relaxed);
            self.respond(channel, ChunkResponse::Busy);
            return;
        }
        // Requests beyond the upload slots wait for one (peers' requests come in bursts,
        // when their have-maps show new chunks): answering `Busy` made them ask again,
        // elsewhere or later, for the same chunks.
        self.waiting.push_back((peer, request, channel));
        self.serve_waiting();
    }

    fn finish(&mut self, id: Sent, response: Option<ChunkResponse>) {
        let Some(p) = self.pending.remove(&id) else { return };
        self.in_flight_bytes -= p.bytes();
        // Whatever a banned peer still had in flight is dropped unread.
        let response = if self.banned.contains_key(&p.peer) { None } else { response };
        // An answer for another number of chunks than asked is no answer.
        let answers: Vec<Answer> = match response {
            Some(ChunkResponse::Run(objects)) if objects.len() == p.items.len() => {
                objects.into_iter().map(|o| o.map_or(Answer::NotFound, Answer::Object)).collect()
            }
            Some(ChunkResponse::Busy) => p.items.iter().map(|_| Answer::Busy).collect(),
            _ => p.items.iter().map(|_| Answer::Failed).collect(),
        };
        if let Some(s) = self.peers.get_mut(&p.peer) {
            s.in_flight = s.in_flight.saturating_sub(1);
            let got: usize = answers.iter().map(|a| if let Answer::Object(o) = a { o.len() } else { 0 }).sum::<usize>();
            let found = answers.iter().filter(|a| matches!(a, Answer::Object(_))).count() as u64;
            let missing = answers.iter().filter(|a| matches!(a, Answer::NotFound)).count() as u64;
            s.hits += found;
            s.misses += missing;
            if found > 0 {
                let secs = p.started.elapsed().as_secs_f64().max(1e-4);
                let rate = got.max(p.bytes() as usize / 4) as f64 / secs;
                s.bps = Some(s.bps.map_or(rate, |old| old * 0.8 + rate * 0.2));
            }
        }
        for (item, answer) in p.items.into_iter().zip(answers) {
            let _ = item.reply.send(Some((p.peer, answer)));
        }
        self.drain_queue();
    }

    fn swarm_event(&mut self, ev: SwarmEvent<BehaviourEvent>) {
        match ev {
            SwarmEvent::Behaviour(BehaviourEvent::Chunks(ev)) => self.chunk_event(ev),
            SwarmEvent::Behaviour(BehaviourEvent::Release(ev)) => self.release_event(ev),
            SwarmEvent::Behaviour(BehaviourEvent::Identify(identify::Event::Received { peer_id, info, .. })) => {
                let role = Role::from_agent_version(&info.agent_version);
                if let Some(s) = self.peers.get_mut(&peer_id) {
                    s.role = role;
                    s.pipe = info.protocols.contains(&PIPE_PROTOCOL);
                }
                // A Flotilla peer's listen addresses go into Kademlia's routing table.
                if role.is_some()
                    && info.protocols.iter().any(|p| p.as_ref() == KAD_PROTOCOL)
                    && let Some(kad) = self.swarm.behaviour_mut().kad.as_mut()
                {
                    for addr in info.listen_addrs.into_iter().filter(is_dialable) {
                        kad.add_address(&peer_id, addr);
                    }
                }
                tracing::debug!(peer = %peer_id, agent = %info.agent_version, "peer identified");
            }
            SwarmEvent::Behaviour(BehaviourEvent::Identify(_)) => {}
            SwarmEvent::Behaviour(BehaviourEvent::Mdns(mdns::Event::Discovered(found))) => {
                for (peer, addr) in found {
                    if self.discovered.len() < self.config.max_connections as usize * 2
                        || self.discovered.contains_key(&peer)
                    {
                        self.discovered.insert(peer, addr.clone());
                    }
                    tracing::debug!(%peer, %addr, "discovered on the local network");
                    self.dial(addr.with(Protocol::P2p(peer)));
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Mdns(mdns::Event::Expired(gone))) => {
                for (peer, addr) in gone {
                    if self.discovered.get(&peer) == Some(&addr) {
                        self.discovered.remove(&peer);
                    }
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Gossipsub(ev)) => self.gossip_event(ev),
            SwarmEvent::Behaviour(BehaviourEvent::Kad(ev)) => self.kad_event(ev),
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
                    no_exchange: false,
                    pipe: false,
                });
                self.drain_queue();
                if let Some(t) = &self.tracked
                    && !t.asked.contains(&peer_id)
                {
                    let (index, max_len) = (t.index, t.map_len);
                    self.ask_haves(peer_id, ReleaseAsk::HaveMap, index, max_len);
                }
            }
            SwarmEvent::ConnectionClosed { peer_id, num_established: 0, .. } => {
                if let Some(t) = self.tracked.as_mut() {
                    t.forget(&peer_id);
                }
                tracing::info!(peer = %peer_id, "peer disconnected");
                self.peers.remove(&peer_id);
                // Its pipe's requests fail as the stream breaks.
                self.pipes.remove(&peer_id);
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
                self.counters.failed_connections.fetch_add(1, Ordering::Relaxed);
                tracing::info!(peer = ?peer_id, %error, "could not connect to a peer");
            }
            SwarmEvent::IncomingConnectionError { error, .. } => {
                self.counters.failed_connections.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(%error, "incoming connection failed");
            }
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
                self.inbound(peer, request, Channel::Stream(channel));
            }
            Event::Message { message: Message::Response { request_id, response }, .. } => {
                self.finish(Sent::Stream(request_id), Some(response));
            }
            Event::OutboundFailure { peer, request_id, error, .. } => {
                tracing::debug!(%peer, %error, "chunk request failed");
                if matches!(error, request_response::OutboundFailure::Timeout) {
                    // A peer cut off leaves its connection looking open until keep-alives
                    // fail; drop it now so the next requests go elsewhere (mDNS or the
                    // bootstrap list bring it back when it is reachable again).
                    tracing::info!(%peer, "peer did not answer in time; disconnecting");
                    let _ = self.swarm.disconnect_peer_id(peer);
                }
                self.finish(Sent::Stream(request_id), None);
            }
            Event::InboundFailure { peer, error, .. } => tracing::debug!(%peer, %error, "serving a chunk failed"),
            Event::ResponseSent { .. } => {}
        }
    }

    fn release_event(&mut self, ev: request_response::Event<ReleaseRequest, ReleaseResponse>) {
        use request_response::{Event, Message};
        match ev {
            Event::Message { peer, message: Message::Request { request, channel, .. }, .. } => {
                if let Some(response) = self.release_inbound(peer, request) {
                    let _ = self.swarm.behaviour_mut().release.send_response(channel, response);
                }
            }
            Event::Message { peer, message: Message::Response { request_id, response }, .. } => {
                self.release_answer(peer, Sent::Stream(request_id), response);
            }
            Event::OutboundFailure { peer, request_id, error, .. } => {
                tracing::debug!(%peer, %error, "release request failed");
                self.release_failed(peer, Sent::Stream(request_id));
            }
            Event::InboundFailure { peer, error, .. } => {
                tracing::debug!(%peer, %error, "answering a release request failed")
            }
            Event::ResponseSent { .. } => {}
        }
    }

    /// The answer to a peer's release request (`None`: the peer is banned, no answer).
    fn release_inbound(&mut self, peer: PeerId, request: ReleaseRequest) -> Option<ReleaseResponse> {
        if self.banned.contains_key(&peer) {
            return None;
        }
        // Small answers from files or memory: read beside the swarm, answered at once.
        let provider = self.provider.clone();
        let mut learned = false;
        let found = match request.ask {
            ReleaseAsk::Index => provider.index(&request.index),
            ReleaseAsk::HaveMap => provider.have_map(&request.index),
            ReleaseAsk::Exchange(theirs) => {
                if let Some(t) = self.tracked.as_mut().filter(|t| t.index == request.index)
                    && theirs.len() == t.map_len as usize
                {
                    t.set_haves(peer, theirs);
                    learned = true;
                }
                provider.have_map(&request.index)
            }
        };
        if learned {
            // Requests waiting for a holder may have one now.
            self.drain_queue();
        }
        Some(match found {
            Some(b) if !b.is_empty() && b.len() <= request.max_len as usize => ReleaseResponse::Found(b),
            _ => ReleaseResponse::NotFound,
        })
    }

    /// `peer`'s answer to release request `id`.
    fn release_answer(&mut self, peer: PeerId, id: Sent, response: ReleaseResponse) {
        match self.release_pending.remove(&id) {
            Some(ReleaseWait::Caller(reply)) => {
                let answer = (!self.banned.contains_key(&peer)).then_some(response);
                let _ = reply.send((peer, answer));
            }
            Some(ReleaseWait::HaveMap { index, .. }) => {
                let Some(t) = self.tracked.as_mut().filter(|t| t.index == index) else { return };
                t.asked.remove(&peer);
                if let ReleaseResponse::Found(bits) = response
                    && bits.len() == t.map_len as usize
                {
                    t.set_haves(peer, bits);
                    // Requests waiting for a holder may have one now.
                    self.drain_queue();
                }
            }
            None => {}
        }
    }

    /// Release request `id` to `peer` failed. A failed exchange on a stream of its own means
    /// the peer predates exchanges (one on a pipe only that the pipe broke).
    fn release_failed(&mut self, peer: PeerId, id: Sent) {
        match self.release_pending.remove(&id) {
            Some(ReleaseWait::Caller(reply)) => {
                let _ = reply.send((peer, None));
            }
            Some(ReleaseWait::HaveMap { index, exchange }) => {
                if let Some(t) = self.tracked.as_mut().filter(|t| t.index == index) {
                    t.asked.remove(&peer);
                }
                if exchange
                    && matches!(id, Sent::Stream(_))
                    && let Some(s) = self.peers.get_mut(&peer)
                {
                    s.no_exchange = true;
                }
            }
            None => {}
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
        let verdict = if message.topic == self.offers_topic.hash() {
            self.offer_verdict(&propagation_source, &message.data)
        } else {
            self.announcement_verdict(&propagation_source, &message.data)
        };
        self.swarm.behaviour_mut().gossipsub.report_message_validation_result(
            &message_id,
            &propagation_source,
            verdict,
        );
    }

    fn offer_verdict(&mut self, from: &PeerId, data: &[u8]) -> gossipsub::MessageAcceptance {
        // Without a trust root nothing can be checked: do not relay it either.
        let Some(root) = &self.config.trust_root else { return gossipsub::MessageAcceptance::Ignore };
        match VerifiedOffer::verify(data, root, Timestamp::now()) {
            Ok(offer) => {
                let (m, d) = (offer.manifest().manifest(), offer.directive());
                tracing::debug!(product = %m.product, version = %m.version, basis_points = d.basis_points, "signed offer received");
                let _ = self.offers.send(offer);
                gossipsub::MessageAcceptance::Accept
            }
            Err(e) => {
                tracing::warn!(peer = %from, error = %e, "offer refused");
                gossipsub::MessageAcceptance::Reject
            }
        }
    }

    fn announcement_verdict(&mut self, propagation_source: &PeerId, data: &[u8]) -> gossipsub::MessageAcceptance {
        match &self.config.trust_root {
            Some(root) => match flotilla_core::manifest::verify_signed(data, root, Timestamp::now()) {
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
        }
    }
}
