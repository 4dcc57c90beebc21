//! The mesh node: a [`Mesh`] handle and the actor that owns the libp2p swarm.
//!
//! The actor runs the swarm (TCP with Noise and Yamux, optionally inside a fleet-private
//! network (pnet); QUIC; identify; mDNS; Kademlia with one provider record per release;
//! gossipsub; the chunk protocol, on one long-lived stream per peer where the peer takes it
//! (see `pipe`); connection limits and a block list for bans) and answers
//! commands from the handle. Serving reads the [`ChunkProvider`] on a blocking thread, one
//! call per request, at most [`MeshConfig::max_uploads`] requests at a time (four times as many
//! wait for a slot; beyond that peers are told `Busy`). Fetching asks one peer at a time per chunk, the fastest free one first,
//! with at most [`MAX_IN_FLIGHT_PER_PEER`] requests per peer; callers fetch many chunks in
//! parallel, so load spreads over peers, and the chunks that go to one peer in the same turn
//! of the actor (up to [`RUN_BYTES`]: requests that waited for a free slot, fetches sent
//! together) share one request. Every object is verified against its id before [`Mesh::fetch`]
//! returns it; a peer that sends a bad one is disconnected and banned for
//! [`MeshConfig::ban_for`].

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use flotilla_core::ids::{ChunkId, IndexId};
use flotilla_core::manifest::VerifiedManifest;
use flotilla_core::trust::TrustRoot;
use futures::StreamExt as _;
use libp2p::multiaddr::Protocol;
use libp2p::pnet::PreSharedKey;
use libp2p::swarm::SwarmEvent;
use libp2p::{Multiaddr, PeerId, gossipsub, identity};
use tokio::sync::{broadcast, mpsc, oneshot};

use crate::offer::{OFFERS_TOPIC, VerifiedOffer};
use crate::protocol::{ChunkWant, ReleaseAsk, ReleaseRequest, ReleaseResponse};
use crate::store::ChunkProvider;

mod actor;
mod pipe;

/// Requests in flight to one peer (DESIGN.md: up to 3).
pub const MAX_IN_FLIGHT_PER_PEER: usize = 3;
/// Chunk bytes one request gathers at most: chunks asked for at about the same time that one
/// peer holds go to it in one request (DESIGN.md: runs of 1–4 MiB).
pub const RUN_BYTES: u32 = 1 << 20;
/// Chunk bytes asked for and not answered yet, over all peers: what answers can hold in
/// memory at once. A request over it waits for answers (one request always goes out).
pub const MAX_IN_FLIGHT_BYTES: u64 = 8 << 20;
/// The gossipsub topic of signed release announcements.
pub const RELEASES_TOPIC: &str = "flotilla/releases/1";
/// Largest announcement: a manifest envelope is a few KiB; gossipsub's own default is 64 KiB.
pub const MAX_ANNOUNCEMENT_LEN: usize = 128 << 10;
/// End-game: with this many chunks of the tracked release left, a request not answered
/// within [`ENDGAME_DELAY`] is sent to a second peer too, and the first good answer wins.
pub const ENDGAME_CHUNKS: usize = 8;
/// How long an end-game request waits before it is duplicated.
const ENDGAME_DELAY: Duration = Duration::from_millis(300);
/// How often bans are lifted, bootstrap peers redialled and have-maps refreshed.
const TICK: Duration = Duration::from_secs(1);
/// A peer that tracks the same release and has a higher id waits this long for an exchange
/// of have-maps before it asks itself (see `MeshActor::refresh_haves`).
const EXCHANGE_LAPSE: Duration = Duration::from_secs(3);
/// Throughput assumed for a peer not measured yet (bytes/s): optimistic, so new peers get tried.
const UNMEASURED_BPS: f64 = 64e6;
/// identify's protocol string: peers of another fleet protocol are not our peers.
const IDENTIFY_PROTOCOL: &str = "/flotilla/id/1";
/// Kademlia's protocol: Flotilla's own DHT, not the public IPFS one.
pub const KAD_PROTOCOL: &str = "/flotilla/kad/1";
/// Providers of a release dialled at most per lookup (a lookup can return forged records).
const MAX_PROVIDERS_DIALLED: usize = 16;
/// How often a node fetching a release looks its providers up again.
const PROVIDER_LOOKUP_EVERY: Duration = Duration::from_secs(10);

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
    /// Requests (runs of chunks, up to [`RUN_BYTES`] each from Flotilla nodes) served at
    /// once; four times as many wait for a slot, further ones are answered `Busy`.
    pub max_uploads: usize,
    /// Requests served at once to one peer, so one peer cannot take every upload slot.
    pub max_uploads_per_peer: usize,
    /// Upload budget in object bytes per second over all peers (bursts of one second);
    /// `None`: unlimited. Over budget, requests are answered `Busy`.
    pub max_upload_rate: Option<u64>,
    /// How long a peer that sent a bad chunk stays banned.
    pub ban_for: Duration,
    /// Limit of one chunk request.
    pub request_timeout: Duration,
    /// Ask peers that take them on chunk pipes ([`crate::protocol::PIPE_PROTOCOL`], one
    /// long-lived stream per peer), and take peers' pipes; off, every request has a stream of
    /// its own, as before pipes.
    pub pipes: bool,
    /// Announcements are verified against this root; without one they are ignored.
    pub trust_root: Option<TrustRoot>,
    /// The node's identity; `None`: a new one each start.
    pub keypair: Option<identity::Keypair>,
    /// Fleet-private network: only peers holding this pre-shared key can connect (libp2p
    /// pnet, a XSalsa20 layer under Noise). TCP only: QUIC addresses are refused with a key.
    pub psk: Option<PreSharedKey>,
    /// Find peers of a release beyond the local network with Kademlia (server mode; one
    /// provider record per release, not per chunk).
    pub kademlia: bool,
}

impl MeshConfig {
    /// Defaults for `role`: listen on every IPv4 address on a random TCP port and a random
    /// UDP port (QUIC), mDNS and Kademlia on, 64 connections, 8 uploads at once (4 per peer),
    /// no upload rate cap, bans of 10 minutes, 30 s per request, no pre-shared key.
    pub fn new(role: Role) -> Self {
        Self {
            role,
            listen: default_listen(0, true),
            bootstrap: Vec::new(),
            mdns: true,
            max_connections: 64,
            max_uploads: 8,
            max_uploads_per_peer: 4,
            max_upload_rate: None,
            ban_for: Duration::from_secs(600),
            request_timeout: Duration::from_secs(30),
            pipes: true,
            trust_root: None,
            keypair: None,
            psk: None,
            kademlia: true,
        }
    }

    /// Checks what no transport would: a pre-shared key with a QUIC address (pnet cannot
    /// wrap QUIC, so such a node would talk to peers outside the private network).
    ///
    /// # Errors
    /// [`MeshError::Start`] naming the address.
    pub fn validate(&self) -> Result<(), MeshError> {
        if self.psk.is_some()
            && let Some(a) = self.listen.iter().chain(&self.bootstrap).find(|a| is_quic(a))
        {
            return Err(MeshError::Start(format!(
                "{a}: a fleet-private network (pre-shared key) runs over TCP only; use a /tcp/ address"
            )));
        }
        Ok(())
    }
}

/// Every IPv4 address on TCP `port` and, with `quic`, on UDP `port` for QUIC (0: any port).
pub fn default_listen(port: u16, quic: bool) -> Vec<Multiaddr> {
    let any = Multiaddr::from(std::net::Ipv4Addr::UNSPECIFIED);
    let mut listen = vec![any.clone().with(Protocol::Tcp(port))];
    if quic {
        listen.push(any.with(Protocol::Udp(port)).with(Protocol::QuicV1));
    }
    listen
}

/// Whether `addr` is a QUIC address.
pub fn is_quic(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| matches!(p, Protocol::QuicV1 | Protocol::Quic))
}

/// Reads a pre-shared key file in the go-ipfs `swarm.key` format
/// (`/key/swarm/psk/1.0.0/`, `/base16/`, 64 hex digits).
///
/// # Errors
/// [`MeshError::Start`] naming the file and what is wrong.
pub fn load_psk(path: &std::path::Path) -> Result<PreSharedKey, MeshError> {
    let meta = std::fs::metadata(path).map_err(|e| MeshError::Start(format!("{}: {e}", path.display())))?;
    // A key file is three short lines; refuse to read anything else into memory.
    if meta.len() > 1024 {
        return Err(MeshError::Start(format!("{}: not a pre-shared key file (over 1 KiB)", path.display())));
    }
    let text = std::fs::read_to_string(path).map_err(|e| MeshError::Start(format!("{}: {e}", path.display())))?;
    text.parse().map_err(|e| {
        MeshError::Start(format!(
            "{}: not a pre-shared key file ({e}); expected /key/swarm/psk/1.0.0/, /base16/ and 64 hex digits",
            path.display()
        ))
    })
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
    /// No peer could provide the chunk index.
    #[error("no peer provided index {id} ({asked} asked)")]
    IndexNotFound {
        /// The index.
        id: IndexId,
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
    served_requests: AtomicU64,
    requests: AtomicU64,
    pipe_requests: AtomicU64,
    have_requests: AtomicU64,
    busy: AtomicU64,
    fetched_chunks: AtomicU64,
    fetched_bytes: AtomicU64,
    bad_chunks: AtomicU64,
    bans: AtomicU64,
    failed_connections: AtomicU64,
}

/// A snapshot of a node's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MeshStats {
    /// Chunks served to peers.
    pub served_chunks: u64,
    /// Object bytes served to peers.
    pub served_bytes: u64,
    /// Chunk requests answered with objects (each names a run of chunks).
    pub served_requests: u64,
    /// Chunk requests sent to peers.
    pub requests: u64,
    /// Chunk and have-map requests sent on pipes (of `requests` and `have_requests`).
    pub pipe_requests: u64,
    /// Have-map requests sent to peers (plain or exchanges).
    pub have_requests: u64,
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
    /// Connections that failed before they were established (either way): unreachable
    /// peers, failed handshakes (another fleet's key), refused by limits.
    pub failed_connections: u64,
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
    /// Whether its have-map of the tracked release ([`Mesh::track`]) arrived.
    pub have_map: bool,
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
    Request {
        want: ChunkWant,
        exclude: HashSet<PeerId>,
        /// An end-game duplicate: goes to a peer not already asked for the chunk.
        duplicate: bool,
        reply: oneshot::Sender<Option<(PeerId, Answer)>>,
    },
    Ban {
        peer: PeerId,
    },
    Peers {
        reply: oneshot::Sender<Vec<PeerInfo>>,
    },
    ListenAddrs {
        reply: oneshot::Sender<Vec<Multiaddr>>,
    },
    Announce {
        envelope: Vec<u8>,
        offer: bool,
        reply: oneshot::Sender<Result<(), MeshError>>,
    },
    Release {
        req: ReleaseRequest,
        peer: PeerId,
        reply: actor::ReleaseReply,
    },
    Track {
        release: Option<actor::Tracked>,
    },
    Provide {
        index: IndexId,
    },
}

/// What one peer answered about one chunk.
enum Answer {
    /// The object, not verified yet.
    Object(Vec<u8>),
    NotFound,
    Busy,
    /// The request failed (timeout, connection lost, an answer that did not parse).
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
    offers: broadcast::Sender<VerifiedOffer>,
    /// Distinct chunks of the tracked release not fetched from peers yet (end-game below
    /// [`ENDGAME_CHUNKS`]); `usize::MAX` when no release is tracked.
    remaining: Arc<std::sync::atomic::AtomicUsize>,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Request { .. } => "Request",
            Self::Ban { .. } => "Ban",
            Self::Peers { .. } => "Peers",
            Self::ListenAddrs { .. } => "ListenAddrs",
            Self::Announce { .. } => "Announce",
            Self::Release { .. } => "Release",
            Self::Track { .. } => "Track",
            Self::Provide { .. } => "Provide",
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
        config.validate()?;
        let key = config.keypair.clone().unwrap_or_else(identity::Keypair::generate_ed25519);
        let local = key.public().to_peer_id();
        let mut swarm = actor::build_swarm(&config, key)?;
        let mut waiting = HashSet::new();
        for addr in &config.listen {
            let id =
                swarm.listen_on(addr.clone()).map_err(|e| MeshError::Start(format!("listening on {addr}: {e}")))?;
            waiting.insert(id);
        }
        // Wait for the listeners so callers can print and hand out real addresses.
        let mut addrs = Vec::new();
        let started = Instant::now();
        while !waiting.is_empty() {
            let ev = tokio::time::timeout(Duration::from_secs(10).saturating_sub(started.elapsed()), swarm.next())
                .await
                .map_err(|_| MeshError::Start("listeners did not come up".into()))?;
            match ev {
                Some(SwarmEvent::NewListenAddr { listener_id, address }) => {
                    // One listener on 0.0.0.0 reports every interface; the first one will do.
                    waiting.remove(&listener_id);
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
        let offers_topic = gossipsub::IdentTopic::new(OFFERS_TOPIC);
        swarm
            .behaviour_mut()
            .gossipsub
            .subscribe(&offers_topic)
            .map_err(|e| MeshError::Start(format!("subscribing to offers: {e}")))?;
        let (offers, _) = broadcast::channel(16);
        let (tx, rx) = mpsc::channel(256);
        let counters = Arc::new(Counters::default());
        let (announcements, _) = broadcast::channel(16);
        actor::spawn(actor::Parts {
            swarm,
            rx,
            config,
            provider,
            counters: counters.clone(),
            announcements: announcements.clone(),
            topic,
            offers: offers.clone(),
            offers_topic,
            listen_addrs: addrs,
        });
        let remaining = Arc::new(std::sync::atomic::AtomicUsize::new(usize::MAX));
        Ok(Self { tx, local, counters, announcements, offers, remaining })
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

    /// Tracks the release of `index` (an install begins): its peers' have-maps are pulled
    /// when they connect and every second, peers whose map lacks a chunk are not asked for
    /// it, known holders are preferred, queued requests go out rarest first, and the last
    /// [`ENDGAME_CHUNKS`] chunks get end-game duplicates. `None` stops tracking.
    ///
    /// # Errors
    /// [`MeshError::Stopped`].
    pub async fn track(&self, index: Option<&flotilla_core::index::ChunkIndex>) -> Result<(), MeshError> {
        let release = index.map(actor::Tracked::new);
        self.remaining.store(release.as_ref().map_or(usize::MAX, |t| t.entries.len()), Ordering::Relaxed);
        self.send(Command::Track { release }).await
    }

    /// Asks one peer (chosen by the actor) for `want`; in the end-game a second peer too when
    /// the first is slow, and the first object (else the last answer) is returned.
    async fn ask(&self, want: ChunkWant, exclude: &HashSet<PeerId>) -> Result<Option<(PeerId, Answer)>, MeshError> {
        let (reply, mut rx) = oneshot::channel();
        self.send(Command::Request { want, exclude: exclude.clone(), duplicate: false, reply }).await?;
        if self.remaining.load(Ordering::Relaxed) > ENDGAME_CHUNKS {
            return rx.await.map_err(|_| MeshError::Stopped);
        }
        tokio::select! {
            r = &mut rx => return r.map_err(|_| MeshError::Stopped),
            _ = tokio::time::sleep(ENDGAME_DELAY) => {}
        }
        let (reply, mut rx2) = oneshot::channel();
        self.send(Command::Request { want, exclude: exclude.clone(), duplicate: true, reply }).await?;
        let (first, first_is_one) = tokio::select! {
            r = &mut rx => (r, true),
            r = &mut rx2 => (r, false),
        };
        let first = first.map_err(|_| MeshError::Stopped)?;
        if matches!(&first, Some((_, Answer::Object(_)))) {
            return Ok(first);
        }
        let other = if first_is_one { rx2.await } else { rx.await };
        match other.map_err(|_| MeshError::Stopped)? {
            None => Ok(first),
            some => Ok(some),
        }
    }

    /// Says that this node holds release `index` (all of it, or the part its have-map
    /// tells): a Kademlia provider record, so nodes beyond the local network find it.
    /// Tracking a release ([`Mesh::track`]) provides it too.
    ///
    /// # Errors
    /// [`MeshError::Stopped`].
    pub async fn provide(&self, index: IndexId) -> Result<(), MeshError> {
        self.send(Command::Provide { index }).await
    }

    /// Fetches chunk `id` (`len` bytes) from peers: the fastest free peer first, the next
    /// one when a peer lacks it, is busy or fails. A peer whose object does not verify is
    /// banned and the next one asked. See [`Mesh::track`] for the use of have-maps.
    ///
    /// # Errors
    /// [`MeshError::NotFound`] when every connected peer was asked; [`MeshError::Stopped`].
    pub async fn fetch(&self, id: ChunkId, len: u32) -> Result<Fetched, MeshError> {
        let want = ChunkWant { id, len };
        let mut exclude = HashSet::new();
        loop {
            let Some((peer, answer)) = self.ask(want, &exclude).await? else {
                return Err(MeshError::NotFound { id, asked: exclude.len() });
            };
            exclude.insert(peer);
            let Answer::Object(object) = answer else { continue };
            // Checked here rather than on a blocking thread: hashing a chunk (at most
            // MAX_CHUNK_LEN, typically 64 KiB: tens of microseconds) costs less than handing
            // it to another thread and back.
            let checked = if object.len() as u64 > flotilla_core::object::max_object_len(len) {
                Err(flotilla_core::object::ObjectError::Empty)
            } else {
                flotilla_core::object::decode(&object, &id, len)
            };
            match checked {
                Ok(data) => {
                    self.counters.fetched_chunks.fetch_add(1, Ordering::Relaxed);
                    self.counters.fetched_bytes.fetch_add(object.len() as u64, Ordering::Relaxed);
                    let _ = self.remaining.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |r| {
                        (r != usize::MAX).then(|| r.saturating_sub(1))
                    });
                    return Ok(Fetched { object, data, peer });
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
        self.send(Command::Announce { envelope, offer: false, reply }).await?;
        rx.await.map_err(|_| MeshError::Stopped)?
    }

    /// Announcements that verified against [`MeshConfig::trust_root`], from now on.
    pub fn announcements(&self) -> broadcast::Receiver<VerifiedManifest> {
        self.announcements.subscribe()
    }

    /// Publishes an encoded offer ([`crate::offer`]) on [`OFFERS_TOPIC`].
    ///
    /// # Errors
    /// [`MeshError::Announce`] (for instance when no peer subscribes yet).
    pub async fn announce_offer(&self, offer: Vec<u8>) -> Result<(), MeshError> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Announce { envelope: offer, offer: true, reply }).await?;
        rx.await.map_err(|_| MeshError::Stopped)?
    }

    /// Offers that verified against [`MeshConfig::trust_root`] (manifest, directive and their
    /// agreement), from now on.
    pub fn offers(&self) -> broadcast::Receiver<VerifiedOffer> {
        self.offers.subscribe()
    }

    /// Asks `peer` about release `index`; `None` when the request failed.
    async fn ask_release(&self, peer: PeerId, ask: ReleaseAsk, index: IndexId, max_len: u32) -> Option<Vec<u8>> {
        let (reply, rx) = oneshot::channel();
        let req = ReleaseRequest { ask, index, max_len };
        self.send(Command::Release { req, peer, reply }).await.ok()?;
        match rx.await.ok()?.1? {
            ReleaseResponse::Found(b) => Some(b),
            ReleaseResponse::NotFound => None,
        }
    }

    /// Fetches the chunk index `id` (at most `max_len` bytes, the size the manifest declares)
    /// from the connected peers, caches first; a peer whose answer does not hash to `id` is
    /// banned.
    ///
    /// # Errors
    /// [`MeshError::IndexNotFound`] when no peer had it; [`MeshError::Stopped`].
    pub async fn fetch_index(&self, id: IndexId, max_len: u64) -> Result<Vec<u8>, MeshError> {
        let max = u32::try_from(max_len).unwrap_or(u32::MAX).min(crate::protocol::MAX_RELEASE_DATA);
        let mut peers = self.peers().await?;
        // Caches hold whole releases: ask them first.
        peers.sort_by_key(|p| p.role != Some(Role::Cache));
        for p in &peers {
            let Some(bytes) = self.ask_release(p.id, ReleaseAsk::Index, id, max).await else { continue };
            if IndexId::of(&bytes) == id {
                return Ok(bytes);
            }
            tracing::warn!(peer = %p.id, index = %id, "peer sent a wrong index; banning it");
            self.counters.bad_chunks.fetch_add(1, Ordering::Relaxed);
            self.ban(p.id).await?;
        }
        Err(MeshError::IndexNotFound { id, asked: peers.len() })
    }

    /// The have-map of release `index` that `peer` holds ([`crate::store::ChunkProvider::have_map`]),
    /// at most `max_len` bytes; `None` when it does not know the release or did not answer.
    pub async fn have_map(&self, peer: PeerId, index: IndexId, max_len: u32) -> Option<Vec<u8>> {
        self.ask_release(peer, ReleaseAsk::HaveMap, index, max_len.max(1)).await
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
            served_requests: g(&c.served_requests),
            have_requests: g(&c.have_requests),
            requests: g(&c.requests),
            pipe_requests: g(&c.pipe_requests),
            busy: g(&c.busy),
            fetched_chunks: g(&c.fetched_chunks),
            fetched_bytes: g(&c.fetched_bytes),
            bad_chunks: g(&c.bad_chunks),
            bans: g(&c.bans),
            failed_connections: g(&c.failed_connections),
            peers,
        })
    }

    async fn send(&self, cmd: Command) -> Result<(), MeshError> {
        self.tx.send(cmd).await.map_err(|_| MeshError::Stopped)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
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
    async fn requests_go_on_one_pipe_and_to_peers_without_pipes_on_streams() {
        let data: Vec<u8> = (0..80_000u32).map(|i| (i % 249) as u8).collect();
        let (id, len) = (ChunkId::of(&data), data.len() as u32);
        let memory =
            || Arc::new(Memory { chunks: Mutex::new(HashMap::from([(id, object::encode(&data, 1))])), corrupt: false });
        let piped = Mesh::start(loopback(Role::Cache), memory()).await.unwrap();
        // A node from before pipes takes none.
        let mut config = loopback(Role::Cache);
        config.pipes = false;
        let older = Mesh::start(config, memory()).await.unwrap();
        for (server, on_pipes) in [(&piped, true), (&older, false)] {
            let mut config = loopback(Role::Agent);
            config.bootstrap = vec![server.listen_addrs().await.unwrap()[0].clone()];
            let client = Mesh::start(config, Arc::new(crate::store::NoChunks)).await.unwrap();
            client.wait_for_peers(1, Duration::from_secs(10)).await.unwrap();
            // One after the other (one request each), then together.
            assert_eq!(client.fetch(id, len).await.unwrap().data, data);
            let (a, b) = futures::join!(client.fetch(id, len), client.fetch(id, len));
            assert_eq!((a.unwrap().data, b.unwrap().data), (data.clone(), data.clone()));
            let s = client.stats().await.unwrap();
            assert_eq!(s.pipe_requests, if on_pipes { s.requests } else { 0 }, "{s:?}");
            assert_eq!(s.fetched_chunks, 3);
            assert_eq!(server.stats().await.unwrap().served_chunks, 3);
        }
    }

    /// Serves the chunk `1` (asked for by any id), after `0`.
    struct Slow(Duration, Vec<u8>);

    impl ChunkProvider for Slow {
        fn object(&self, _: &ChunkId, _: u32) -> Option<Vec<u8>> {
            std::thread::sleep(self.0);
            Some(object::encode(&self.1, 1))
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_peer_that_does_not_answer_on_its_pipe_in_time_is_given_up() {
        let data = b"a chunk served slowly".to_vec();
        let slow = Slow(Duration::from_secs(3), data.clone());
        let server = Mesh::start(loopback(Role::Cache), Arc::new(slow)).await.unwrap();
        let mut config = loopback(Role::Agent);
        config.bootstrap = vec![server.listen_addrs().await.unwrap()[0].clone()];
        config.request_timeout = Duration::from_millis(300);
        let client = Mesh::start(config, Arc::new(crate::store::NoChunks)).await.unwrap();
        client.wait_for_peers(1, Duration::from_secs(10)).await.unwrap();
        // Without the timeout the chunk would come after 3 s; the request fails instead.
        let e = client.fetch(ChunkId::of(&data), data.len() as u32).await.unwrap_err();
        assert!(matches!(e, MeshError::NotFound { asked: 1, .. }), "{e}");
        let s = client.stats().await.unwrap();
        assert_eq!((s.requests, s.pipe_requests, s.fetched_chunks), (1, 1, 0), "{s:?}");
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

    /// 600 000 pseudo-random bytes from `seed` and their index in bundle-sized chunks.
    fn chunked_noise(mut x: u64) -> (Vec<u8>, flotilla_core::index::ChunkIndex) {
        let data: Vec<u8> = (0..600_000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 29) as u8
            })
            .collect();
        let index = flotilla_core::chunking::Chunker::new(flotilla_core::chunking::ChunkParams::BUNDLE)
            .chunk_reader(&data[..])
            .unwrap()
            .index;
        (data, index)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn chunks_asked_together_share_requests_and_wait_for_an_upload_slot() {
        let (data, index) = chunked_noise(0x9e37_79b9_7f4a_7c15);
        let mut chunks = HashMap::new();
        for (offset, e) in index.iter_with_offsets() {
            chunks.insert(e.id, object::encode(&data[offset as usize..][..e.len as usize], 1));
        }
        let wants: Vec<(ChunkId, u32)> = index
            .entries()
            .iter()
            .filter(|e| chunks.contains_key(&e.id))
            .map(|e| (e.id, e.len))
            .collect::<std::collections::HashSet<_>>()
            .into_iter()
            .collect();
        let n = wants.len() as u64;
        assert!(n >= 16, "{n} chunks");
        // One upload slot: the asker's requests in flight (up to 3) wait for it.
        let mut config = loopback(Role::Cache);
        config.max_uploads = 1;
        config.max_uploads_per_peer = 1;
        let server =
            Mesh::start(config, Arc::new(Memory { chunks: Mutex::new(chunks), corrupt: false })).await.unwrap();
        let mut config = loopback(Role::Agent);
        config.bootstrap = vec![server.listen_addrs().await.unwrap()[0].clone()];
        let client = Mesh::start(config, Arc::new(crate::store::NoChunks)).await.unwrap();
        client.wait_for_peers(1, Duration::from_secs(10)).await.unwrap();

        let fetches = wants.iter().map(|(id, len)| client.fetch(*id, *len));
        for (got, (id, _)) in futures::future::join_all(fetches).await.into_iter().zip(&wants) {
            assert_eq!(ChunkId::of(&got.unwrap().data), *id);
        }
        let served = server.stats().await.unwrap();
        assert_eq!((served.served_chunks, served.busy), (n, 0), "{served:?}");
        // Chunks queued behind the in-flight limit went out in runs.
        assert!(served.served_requests * 2 <= n, "{} requests for {n} chunks", served.served_requests);
        assert_eq!(client.stats().await.unwrap().requests, served.served_requests);
    }

    /// Holds one index; a liar answers every index request with other bytes.
    struct OneIndex(Vec<u8>, bool);

    impl ChunkProvider for OneIndex {
        fn object(&self, _: &ChunkId, _: u32) -> Option<Vec<u8>> {
            None
        }

        fn index(&self, id: &IndexId) -> Option<Vec<u8>> {
            if self.1 {
                return Some(b"not the index you asked for".to_vec());
            }
            (IndexId::of(&self.0) == *id).then(|| self.0.clone())
        }

        fn have_map(&self, id: &IndexId) -> Option<Vec<u8>> {
            (IndexId::of(&self.0) == *id).then(|| vec![0b101])
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn indexes_come_from_peers_verified_and_a_liar_is_banned() {
        let index = b"an encoded index, as far as the mesh cares".to_vec();
        let id = IndexId::of(&index);
        let liar = Mesh::start(loopback(Role::Cache), Arc::new(OneIndex(index.clone(), true))).await.unwrap();
        let honest = Mesh::start(loopback(Role::Agent), Arc::new(OneIndex(index.clone(), false))).await.unwrap();
        let mut config = loopback(Role::Agent);
        config.bootstrap =
            vec![liar.listen_addrs().await.unwrap()[0].clone(), honest.listen_addrs().await.unwrap()[0].clone()];
        let client = Mesh::start(config, Arc::new(crate::store::NoChunks)).await.unwrap();
        client.wait_for_peers(2, Duration::from_secs(10)).await.unwrap();
        // The cache is asked first, lies, and is banned; the agent's copy verifies.
        assert_eq!(client.fetch_index(id, 1 << 20).await.unwrap(), index);
        assert_eq!(client.stats().await.unwrap().bans, 1);
        assert_eq!(client.have_map(honest.peer_id(), id, 64).await, Some(vec![0b101]));
        assert_eq!(client.have_map(honest.peer_id(), IndexId::of(b"other"), 64).await, None);
        // An answer over the asker's bound is not sent.
        assert!(matches!(client.fetch_index(id, 8).await, Err(MeshError::IndexNotFound { asked: 1, .. })));
        let e = client.fetch_index(IndexId::of(b"unknown"), 1 << 20).await.unwrap_err();
        assert!(matches!(e, MeshError::IndexNotFound { asked: 1, .. }), "{e}");
    }

    /// Holds some chunks of one release and counts requests for chunks it lacks.
    struct Partial {
        chunks: HashMap<ChunkId, Vec<u8>>,
        index: flotilla_core::index::ChunkIndex,
        misses: AtomicU64,
    }

    impl ChunkProvider for Partial {
        fn object(&self, id: &ChunkId, _: u32) -> Option<Vec<u8>> {
            let found = self.chunks.get(id).cloned();
            if found.is_none() {
                self.misses.fetch_add(1, Ordering::Relaxed);
            }
            found
        }

        fn have_map(&self, id: &IndexId) -> Option<Vec<u8>> {
            (*id == self.index.id()).then(|| crate::store::have_map_of(&self.index, |c| self.chunks.contains_key(c)))
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_peer_holding_half_a_release_is_asked_only_for_its_half() {
        let (data, index) = chunked_noise(0x2545_f491_4f6c_dd1d);
        let mut all = HashMap::new();
        let mut half = HashMap::new();
        for (i, (offset, e)) in index.iter_with_offsets().enumerate() {
            let obj = object::encode(&data[offset as usize..][..e.len as usize], 1);
            if i % 2 == 0 {
                half.insert(e.id, obj.clone());
            }
            all.insert(e.id, obj);
        }
        assert!(index.len() >= 12, "{} chunks", index.len());
        let full = Arc::new(Partial { chunks: all, index: index.clone(), misses: AtomicU64::new(0) });
        let halfp = Arc::new(Partial { chunks: half, index: index.clone(), misses: AtomicU64::new(0) });
        let a = Mesh::start(loopback(Role::Agent), full.clone()).await.unwrap();
        let b = Mesh::start(loopback(Role::Agent), halfp.clone()).await.unwrap();
        let mut config = loopback(Role::Agent);
        config.bootstrap = vec![a.listen_addrs().await.unwrap()[0].clone(), b.listen_addrs().await.unwrap()[0].clone()];
        let client = Mesh::start(config, Arc::new(crate::store::NoChunks)).await.unwrap();
        client.wait_for_peers(2, Duration::from_secs(10)).await.unwrap();
        client.track(Some(&index)).await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while client.peers().await.unwrap().iter().filter(|p| p.have_map).count() < 2 {
            assert!(Instant::now() < deadline, "have-maps did not arrive");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Every chunk at once: the full peer's in-flight limit sends the rest to the other.
        let fetches = index.entries().iter().map(|e| client.fetch(e.id, e.len));
        for (got, e) in futures::future::join_all(fetches).await.into_iter().zip(index.entries()) {
            assert_eq!(ChunkId::of(&got.unwrap().data), e.id);
        }
        assert_eq!(halfp.misses.load(Ordering::Relaxed), 0, "the half peer was asked for a chunk it lacks");
        assert!(b.stats().await.unwrap().served_chunks > 0, "the half peer was not used at all");
        assert_eq!(full.misses.load(Ordering::Relaxed), 0);
    }

    /// Chunks of one release, held as a test adds them.
    struct Growing {
        data: Vec<u8>,
        index: flotilla_core::index::ChunkIndex,
        held: Mutex<std::collections::HashSet<ChunkId>>,
    }

    impl Growing {
        fn hold(&self, id: ChunkId) {
            self.held.lock().unwrap().insert(id);
        }
    }

    impl ChunkProvider for Growing {
        fn object(&self, id: &ChunkId, _: u32) -> Option<Vec<u8>> {
            if !self.held.lock().unwrap().contains(id) {
                return None;
            }
            let (offset, e) = self.index.iter_with_offsets().find(|(_, e)| e.id == *id)?;
            Some(object::encode(&self.data[offset as usize..][..e.len as usize], 1))
        }

        fn have_map(&self, id: &IndexId) -> Option<Vec<u8>> {
            let held = self.held.lock().unwrap();
            (*id == self.index.id()).then(|| crate::store::have_map_of(&self.index, |c| held.contains(c)))
        }
    }

    /// Waits until `mesh` can fetch `e` from a peer (its have-maps say who holds it).
    async fn fetch_when_known(mesh: &Mesh, e: &flotilla_core::index::IndexEntry) -> Fetched {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match mesh.fetch(e.id, e.len).await {
                Ok(f) => return f,
                Err(MeshError::NotFound { .. }) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(err) => panic!("chunk {} never became known: {err}", e.id),
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_peers_fetching_one_release_exchange_have_maps_in_one_request() {
        // On pipes, and on a stream per request (nodes from before pipes).
        for pipes in [true, false] {
            exchange_have_maps(pipes).await;
        }
    }

    async fn exchange_have_maps(pipes: bool) {
        let (data, index) = chunked_noise(0x9e37_79b9_7f4a_7c15);
        let grow = || Arc::new(Growing { data: data.clone(), index: index.clone(), held: Mutex::default() });
        let (px, py) = (grow(), grow());
        let agent = || {
            let mut config = loopback(Role::Agent);
            config.pipes = pipes;
            config
        };
        let x = Mesh::start(agent(), px.clone()).await.unwrap();
        let mut config = agent();
        config.bootstrap = vec![x.listen_addrs().await.unwrap()[0].clone()];
        let y = Mesh::start(config, py.clone()).await.unwrap();
        // Each has identified the other before tracking, so every have-map request can take
        // a pipe (identify says whether the peer takes them).
        for mesh in [&x, &y] {
            mesh.wait_for_peers(1, Duration::from_secs(10)).await.unwrap();
        }
        // The lower id leads the exchange; the other only answers.
        let ((leader, lp), (follower, fp)) =
            if x.peer_id() < y.peer_id() { ((&x, &px), (&y, &py)) } else { ((&y, &py), (&x, &px)) };
        leader.track(Some(&index)).await.unwrap();
        follower.track(Some(&index)).await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        for mesh in [leader, follower] {
            while !mesh.peers().await.unwrap().iter().any(|p| p.have_map) {
                assert!(Instant::now() < deadline, "no have-map arrived");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        // Chunks each comes to hold once both know the other's (empty) map: each learns of
        // the other's through the leader's later exchanges.
        let entries = index.entries();
        lp.hold(entries[0].id);
        fp.hold(entries[1].id);
        let got = fetch_when_known(follower, &entries[0]).await;
        assert_eq!((ChunkId::of(&got.data), got.peer), (entries[0].id, leader.peer_id()));
        let got = fetch_when_known(leader, &entries[1]).await;
        assert_eq!((ChunkId::of(&got.data), got.peer), (entries[1].id, follower.peer_id()));
        let (ls, fs) = (leader.stats().await.unwrap(), follower.stats().await.unwrap());
        let (l, f) = (ls.have_requests, fs.have_requests);
        assert!(l >= 2, "the leader asked {l} times");
        // The follower asked once, when it began tracking (it knew nothing of the leader yet),
        // and never again: the leader's exchanges kept it up to date.
        assert_eq!(f, 1, "the follower asked for have-maps itself");
        // With pipes, every request (both began tracking once identified) went on one.
        for s in [ls, fs] {
            assert_eq!(s.pipe_requests, if pipes { s.have_requests + s.requests } else { 0 }, "{s:?}");
        }
    }

    fn memory(data: &[u8]) -> Arc<Memory> {
        let chunks = Mutex::new(HashMap::from([(ChunkId::of(data), object::encode(data, 1))]));
        Arc::new(Memory { chunks, corrupt: false })
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn peers_exchange_chunks_over_quic() {
        let data: Vec<u8> = (0..80_000u32).map(|i| (i % 241) as u8).collect();
        let quic: Multiaddr = "/ip4/127.0.0.1/udp/0/quic-v1".parse().unwrap();
        // Both nodes listen on QUIC only: the one connection they make is QUIC.
        let mut config = loopback(Role::Cache);
        config.listen = vec![quic.clone()];
        let server = Mesh::start(config, memory(&data)).await.unwrap();
        let addrs = server.listen_addrs().await.unwrap();
        assert!(addrs.iter().all(is_quic), "{addrs:?}");
        let mut config = loopback(Role::Agent);
        config.listen = vec![quic];
        config.bootstrap = vec![addrs[0].clone()];
        let client = Mesh::start(config, Arc::new(crate::store::NoChunks)).await.unwrap();
        let peers = client.wait_for_peers(1, Duration::from_secs(10)).await.unwrap();
        assert_eq!(peers.iter().map(|p| (p.id, p.role)).collect::<Vec<_>>(), [(server.peer_id(), Some(Role::Cache))]);
        let got = client.fetch(ChunkId::of(&data), data.len() as u32).await.unwrap();
        assert_eq!((got.data, got.peer), (data, server.peer_id()));
    }

    /// Waits until `mesh` counts a failed connection (the handshake with a peer outside its
    /// private network), then returns its stats.
    async fn after_a_failed_connection(mesh: &Mesh) -> MeshStats {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let stats = mesh.stats().await.unwrap();
            if stats.failed_connections > 0 {
                return stats;
            }
            assert!(Instant::now() < deadline, "no connection failed: {stats:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_private_network_admits_only_holders_of_its_key() {
        let data: Vec<u8> = (0..60_000u32).map(|i| (i % 239) as u8).collect();
        let (id, len) = (ChunkId::of(&data), data.len() as u32);
        let fleet = PreSharedKey::new([7; 32]);
        let mut config = loopback(Role::Cache);
        config.psk = Some(fleet);
        let server = Mesh::start(config, memory(&data)).await.unwrap();
        let addr = server.listen_addrs().await.unwrap()[0].clone();

        // Same key: connects and fetches.
        let mut config = loopback(Role::Agent);
        config.psk = Some(fleet);
        config.bootstrap = vec![addr.clone()];
        let member = Mesh::start(config, Arc::new(crate::store::NoChunks)).await.unwrap();
        member.wait_for_peers(1, Duration::from_secs(10)).await.unwrap();
        assert_eq!(member.fetch(id, len).await.unwrap().data, data);

        // Another fleet's key, or none at all: the handshake fails, nothing is exchanged.
        for psk in [Some(PreSharedKey::new([8; 32])), None] {
            let mut config = loopback(Role::Agent);
            config.psk = psk;
            config.bootstrap = vec![addr.clone()];
            let outsider = Mesh::start(config, Arc::new(crate::store::NoChunks)).await.unwrap();
            let stats = after_a_failed_connection(&outsider).await;
            assert_eq!(stats.peers, 0, "{psk:?}: {stats:?}");
            assert!(matches!(outsider.fetch(id, len).await, Err(MeshError::NotFound { asked: 0, .. })));
        }
        assert_eq!(server.stats().await.unwrap().served_chunks, 1, "only the member was served");

        // QUIC cannot be wrapped by the private network: refused before anything listens.
        let mut config = loopback(Role::Agent);
        config.psk = Some(fleet);
        config.listen.push("/ip4/127.0.0.1/udp/0/quic-v1".parse().unwrap());
        let e = Mesh::start(config, Arc::new(crate::store::NoChunks)).await.unwrap_err();
        assert!(e.to_string().contains("TCP only"), "{e}");
    }

    #[test]
    fn pre_shared_key_files_are_parsed_and_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("swarm.key");
        let key = PreSharedKey::new([0xab; 32]);
        std::fs::write(&good, key.to_key_file()).unwrap();
        assert_eq!(load_psk(&good).unwrap().fingerprint().to_string(), key.fingerprint().to_string());
        let bad = dir.path().join("bad.key");
        std::fs::write(&bad, "/key/swarm/psk/1.0.0/\n/base16/\nnot hex\n").unwrap();
        assert!(load_psk(&bad).unwrap_err().to_string().contains("not a pre-shared key file"));
        let big = dir.path().join("big.key");
        std::fs::write(&big, vec![b'a'; 4096]).unwrap();
        assert!(load_psk(&big).unwrap_err().to_string().contains("over 1 KiB"));
        assert!(load_psk(&dir.path().join("missing")).is_err());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn kademlia_finds_a_release_holder_beyond_the_bootstrap_peer() {
        let data: Vec<u8> = (0..300_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
        let index = flotilla_core::chunking::Chunker::new(flotilla_core::chunking::ChunkParams::BUNDLE)
            .chunk_reader(&data[..])
            .unwrap()
            .index;
        let chunks = index
            .iter_with_offsets()
            .map(|(off, e)| (e.id, object::encode(&data[off as usize..][..e.len as usize], 1)))
            .collect();
        // A rendezvous node that holds nothing, and a holder and a fetcher that know only it
        // (no mDNS): only a provider record can bring the two together.
        let hub = Mesh::start(loopback(Role::Cache), Arc::new(crate::store::NoChunks)).await.unwrap();
        let hub_addr = hub.listen_addrs().await.unwrap()[0].clone();
        let mut config = loopback(Role::Agent);
        config.bootstrap = vec![hub_addr.clone()];
        let holder =
            Mesh::start(config, Arc::new(Memory { chunks: Mutex::new(chunks), corrupt: false })).await.unwrap();
        holder.wait_for_peers(1, Duration::from_secs(10)).await.unwrap();
        holder.provide(index.id()).await.unwrap();

        let mut config = loopback(Role::Agent);
        config.bootstrap = vec![hub_addr];
        let fetcher = Mesh::start(config, Arc::new(crate::store::NoChunks)).await.unwrap();
        fetcher.wait_for_peers(1, Duration::from_secs(10)).await.unwrap();
        fetcher.track(Some(&index)).await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while !fetcher.peers().await.unwrap().iter().any(|p| p.id == holder.peer_id()) {
            assert!(Instant::now() < deadline, "the holder was not found through Kademlia");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        for e in index.entries() {
            let got = fetcher.fetch(e.id, e.len).await.unwrap();
            assert_eq!((ChunkId::of(&got.data), got.peer), (e.id, holder.peer_id()));
        }
        assert_eq!(hub.stats().await.unwrap().served_chunks, 0);
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
