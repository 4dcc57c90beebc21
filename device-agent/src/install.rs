//! Writing a release into the inactive slot: plan, reuse, fetch, verify, write, resume.
//!
//! Each chunk of the new image comes from the first of:
//! 1. the target slot itself, when a resumed install finds it already written there
//!    (the progress bitmap, or for chunks written after the last checkpoint a hash in place);
//! 2. the active slot, when it holds a chunk with the same id (found through the index kept
//!    from its install, or by re-chunking it with the manifest's parameters);
//! 3. the network (the coordinator's `/v1/chunks/{id}` or the CDN it redirects to) or a local
//!    export, `parallel` requests at a time, with retries and capped exponential backoff.
//!
//! Every chunk is verified (BLAKE3 against the index) before it is written at its offset(s).
//! The slot is `fdatasync`ed before the progress record claims what was written. Checkpoints
//! (sync, then the record) run beside the fetches, and the read-back of the whole image
//! (SHA-256 of the slot as read from the file) follows the synced prefix of the slot while
//! the rest downloads, so the check a switch waits for costs little more than its tail.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use flotilla_core::chunking::{ChunkParams, Chunker};
use flotilla_core::ids::{ChunkId, Sha256Digest};
use flotilla_core::index::ChunkIndex;
use flotilla_core::object::{self, ObjectError};
use sha2::Digest as _;

use crate::client::{ClientError, Coordinator};
use crate::crash;
use crate::journal::{self, ByteSources, Progress};
use crate::slot::{SlotName, Slots};

/// Checkpoint the progress record after this many bytes written…
const CHECKPOINT_BYTES: u64 = 64 << 20;
/// …or this much time, whichever comes first (update_engine-style checkpointing).
const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(2);
/// First retry delay of a chunk fetch.
const BACKOFF_BASE: Duration = Duration::from_millis(100);
/// Longest retry delay.
const BACKOFF_CAP: Duration = Duration::from_secs(10);

/// Why writing the slot failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WriteError {
    /// I/O on a slot.
    #[error("slot {slot}: {source}")]
    Io {
        /// The slot.
        slot: SlotName,
        /// The cause.
        source: std::io::Error,
    },
    /// The file system holding the slot (or the progress record) is full.
    #[error(
        "slot {slot}: no space left for the {size}-byte image ({source}); the active slot is untouched, \
         and the install resumes at the next check once there is room"
    )]
    NoSpace {
        /// The slot.
        slot: SlotName,
        /// The image size.
        size: u64,
        /// The cause.
        source: std::io::Error,
    },
    /// A chunk kept failing verification.
    #[error("chunk {id} failed verification {attempts} times ({source}); the content store serves bad data")]
    BadChunk {
        /// The chunk.
        id: ChunkId,
        /// Attempts made.
        attempts: u32,
        /// The last verification error.
        source: ObjectError,
    },
    /// A chunk could not be fetched.
    #[error("chunk {id} could not be fetched after {attempts} attempts: {source}")]
    Unavailable {
        /// The chunk.
        id: ChunkId,
        /// Attempts made.
        attempts: u32,
        /// The last error.
        source: ClientError,
    },
    /// A chunk is missing from a local export.
    #[error("chunk {id} is missing or unreadable in the export: {source}")]
    ExportChunk {
        /// The chunk.
        id: ChunkId,
        /// The cause.
        source: std::io::Error,
    },
    /// Re-chunking the active slot failed.
    #[error("re-chunking the active slot: {0}")]
    Rechunk(String),
    /// A worker task stopped (a bug).
    #[error("a download task stopped unexpectedly: {0}")]
    Task(String),
}

impl WriteError {
    /// An I/O error while writing `slot`, naming a full file system as such.
    pub(crate) fn slot_io(slot: SlotName, size: u64, source: std::io::Error) -> Self {
        if source.kind() == std::io::ErrorKind::StorageFull {
            Self::NoSpace { slot, size, source }
        } else {
            Self::Io { slot, source }
        }
    }

    /// Whether a later retry (next poll) can succeed without anything changing on the device.
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Unavailable { source, .. } if source.is_transient())
    }
}

/// Where missing chunks come from.
#[derive(Debug, Clone)]
pub enum ChunkSource {
    /// A coordinator (or the CDN its content URLs redirect to).
    Coordinator(Coordinator),
    /// A `flotilla export` directory (`chunks/ab/<id>`).
    Export(PathBuf),
    /// Peers over the mesh first, then the coordinator.
    Peer(crate::peer::PeerFirst),
}

/// What a source returned for a chunk.
#[derive(Debug)]
pub(crate) enum Got {
    /// A chunk object, still to decode and verify.
    Object(Vec<u8>),
    /// The chunk's bytes, already verified against its id (the mesh checks what peers send).
    Verified(Vec<u8>),
}

impl ChunkSource {
    async fn fetch(&self, id: &ChunkId, len: u32) -> Result<Got, FetchError> {
        let limit = object::max_object_len(len);
        match self {
            Self::Coordinator(c) => {
                c.get_bounded(&format!("/v1/chunks/{id}"), limit).await.map(Got::Object).map_err(FetchError::Client)
            }
            Self::Peer(p) => p.fetch(id, len).await.map_err(FetchError::Client),
            Self::Export(dir) => {
                let hex = id.to_hex();
                let path = dir.join("chunks").join(&hex[..2]).join(&hex);
                let meta = std::fs::metadata(&path).map_err(FetchError::Export)?;
                if meta.len() > limit {
                    return Ok(Got::Object(Vec::new())); // fails decoding as Empty; an oversized file is bad data
                }
                std::fs::read(&path).map(Got::Object).map_err(FetchError::Export)
            }
        }
    }

    /// The coordinator behind this source (patch indexes come from it), if any.
    pub(crate) fn coordinator(&self) -> Option<&Coordinator> {
        match self {
            Self::Coordinator(c) => Some(c),
            Self::Peer(p) => Some(p.cdn()),
            Self::Export(_) => None,
        }
    }

    fn label(&self) -> &'static str {
        match self {
            Self::Coordinator(_) | Self::Peer(_) => "cdn",
            Self::Export(_) => "file",
        }
    }

    /// `id` was written to `path`, verified: peers are told of it from now on. Returns where
    /// the last fetch of `id` came from: `peer`, `cdn` or `file`.
    pub(crate) fn written(&self, id: &ChunkId, path: &Path) -> &'static str {
        match self {
            Self::Peer(p) => p.written(id, path),
            other => other.label(),
        }
    }
}

enum FetchError {
    Client(ClientError),
    Export(std::io::Error),
}

/// A simple average-rate cap shared by all downloads.
#[derive(Debug)]
pub(crate) struct RateCap {
    started: Instant,
    rate: u64,
    bytes: std::sync::atomic::AtomicU64,
}

impl RateCap {
    /// A cap of `rate` bytes per second from now.
    pub(crate) fn new(rate: u64) -> Self {
        Self { started: Instant::now(), rate, bytes: 0.into() }
    }

    /// Waits until `n` more bytes fit under the cap.
    pub(crate) async fn take(&self, n: u64) {
        let total = self.bytes.fetch_add(n, std::sync::atomic::Ordering::SeqCst) + n;
        let due = Duration::from_secs_f64(total as f64 / self.rate as f64);
        let elapsed = self.started.elapsed();
        if due > elapsed {
            tokio::time::sleep(due - elapsed).await;
        }
    }
}

/// Busy time per install phase, summed over the parallel tasks (so a phase can exceed the
/// wall time); logged at the end of an install as a cheap profile.
#[derive(Debug, Default)]
pub(crate) struct Phases {
    fetch: std::sync::atomic::AtomicU64,
    verify: std::sync::atomic::AtomicU64,
    write: std::sync::atomic::AtomicU64,
    sync: std::sync::atomic::AtomicU64,
    hash: std::sync::atomic::AtomicU64,
}

impl Phases {
    fn add(counter: &std::sync::atomic::AtomicU64, since: Instant) {
        let nanos = u64::try_from(since.elapsed().as_nanos()).unwrap_or(u64::MAX);
        counter.fetch_add(nanos, std::sync::atomic::Ordering::Relaxed);
    }

    fn ms(counter: &std::sync::atomic::AtomicU64) -> u64 {
        counter.load(std::sync::atomic::Ordering::Relaxed) / 1_000_000
    }
}

/// What [`write_slot`] did.
#[derive(Debug, Clone, Copy)]
pub struct Written {
    /// Bytes by source, this run plus earlier runs.
    pub bytes: ByteSources,
    /// SHA-256 of the whole slot image, read back from the slot file after it was synced.
    pub sha256: Sha256Digest,
}

/// Reads the slot back and hashes it while the install goes on: it is told how far the slot
/// is complete *and synced* (a prefix that only grows) and reads up to there, so the
/// whole-image check after the last chunk has only the tail left to read.
struct ReadBack {
    upto: std::sync::mpsc::Sender<u64>,
    task: tokio::task::JoinHandle<std::io::Result<(u64, sha2::Sha256)>>,
}

impl ReadBack {
    fn start(path: PathBuf, file: Arc<File>, phases: Arc<Phases>) -> Self {
        let (upto, rx) = std::sync::mpsc::channel::<u64>();
        let task = tokio::task::spawn_blocking(move || {
            let mut sha = sha2::Sha256::new();
            // The prefix up to `end` is synced: the hash is of what the media returns
            // (DESIGN.md: "check its SHA-256 from the media").
            let mut media = crate::slot::MediaReader::open(&path, file);
            let mut pos = 0u64;
            for end in rx {
                let t = Instant::now();
                if end > pos {
                    media.read(pos, end, &mut |b| sha.update(b))?;
                    pos = end;
                }
                Phases::add(&phases.hash, t);
            }
            Ok((pos, sha))
        });
        Self { upto, task }
    }

    /// The slot is complete and synced up to `end`.
    fn advance(&self, end: u64) {
        // A closed channel means the reader failed; `finish` reports why.
        let _ = self.upto.send(end);
    }

    /// The digest of the first `size` bytes, once the reader got there.
    async fn finish(self, size: u64) -> Result<Sha256Digest, std::io::Error> {
        drop(self.upto);
        let (pos, sha) = self.task.await.map_err(|e| std::io::Error::other(e.to_string()))??;
        if pos != size {
            let msg = format!("read back {pos} of {size} bytes");
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, msg));
        }
        Ok(Sha256Digest::from_bytes(sha.finalize().into()))
    }
}

/// The end of the longest prefix of index entries marked done.
#[derive(Debug, Default)]
struct Frontier {
    entry: usize,
    offset: u64,
}

impl Frontier {
    fn advance(&mut self, index: &ChunkIndex, bits: &[u8]) -> u64 {
        let entries = index.entries();
        while self.entry < entries.len() && journal::is_done(bits, self.entry) {
            self.offset += u64::from(entries[self.entry].len);
            self.entry += 1;
        }
        self.offset
    }
}

/// Syncs the slot, then records `bits` as done; returns them. Runs on a blocking thread
/// while the fetches go on: every bit in `bits` is for a chunk whose write returned before
/// this started, so the sync covers it, and the record is written only after the sync.
fn checkpoint(
    file: Arc<File>,
    mut progress: Progress,
    bits: Vec<u8>,
    path: PathBuf,
    phases: Arc<Phases>,
) -> tokio::task::JoinHandle<std::io::Result<Vec<u8>>> {
    tokio::task::spawn_blocking(move || {
        let t = Instant::now();
        file.sync_data()?;
        Phases::add(&phases.sync, t);
        progress.save(&path, &bits)?;
        Ok(bits)
    })
}

/// Waits for the checkpoint in flight, if any (never resolves when there is none).
async fn checkpoint_done(
    in_flight: &mut Option<tokio::task::JoinHandle<std::io::Result<Vec<u8>>>>,
) -> Result<std::io::Result<Vec<u8>>, tokio::task::JoinError> {
    match in_flight {
        Some(h) => h.await,
        None => std::future::pending().await,
    }
}

/// What to write and how.
#[derive(Debug)]
pub struct WritePlan<'a> {
    /// The slots.
    pub slots: &'a Slots,
    /// The slot to write.
    pub target: SlotName,
    /// The new image's index.
    pub index: &'a ChunkIndex,
    /// The active slot and its index, when known; else the active slot is re-chunked.
    pub active: Option<(SlotName, Option<ChunkIndex>)>,
    /// Missing chunks come from here.
    pub source: ChunkSource,
    /// The progress record.
    pub progress_path: PathBuf,
    /// The download log.
    pub downloads_log: PathBuf,
    /// Requests in flight.
    pub parallel: usize,
    /// Attempts per chunk.
    pub attempts: u32,
    /// Bandwidth cap, bytes per second.
    pub max_rate: Option<u64>,
    /// Patches to consider once local reuse is done ([`crate::delta`]).
    pub delta: Option<crate::delta::DeltaPlan>,
}

fn backoff(attempt: u32) -> Duration {
    let exp = BACKOFF_BASE.saturating_mul(1 << attempt.min(16)).min(BACKOFF_CAP);
    let mut r = [0u8; 2];
    let _ = getrandom::fill(&mut r);
    // Full jitter over the upper half, so retries of many devices spread out.
    exp / 2 + exp.mul_f64(f64::from(u16::from_le_bytes(r)) / f64::from(u16::MAX) / 2.0)
}

/// Where each chunk of the new image goes: id → (entry numbers, offsets), in image order.
struct Placement {
    order: Vec<ChunkId>,
    places: HashMap<ChunkId, (u32, Vec<(usize, u64)>)>,
}

fn placement(index: &ChunkIndex, bits: &[u8]) -> Placement {
    let mut order = Vec::new();
    let mut places: HashMap<ChunkId, (u32, Vec<(usize, u64)>)> = HashMap::new();
    for (i, (offset, e)) in index.iter_with_offsets().enumerate() {
        if journal::is_done(bits, i) {
            continue;
        }
        let slot = places.entry(e.id).or_insert_with(|| {
            order.push(e.id);
            (e.len, Vec::new())
        });
        slot.1.push((i, offset));
    }
    Placement { order, places }
}

fn write_all_places(file: &File, data: &[u8], places: &[(usize, u64)]) -> std::io::Result<()> {
    for (_, offset) in places {
        file.write_all_at(data, *offset)?;
    }
    Ok(())
}

/// Finds where the active slot holds each chunk id: from its kept index, else by re-chunking
/// it with `params` (bounded memory: the chunker streams).
fn active_map(
    slots: &Slots,
    active: SlotName,
    kept: Option<ChunkIndex>,
    params: ChunkParams,
) -> Result<HashMap<ChunkId, (u64, u32)>, WriteError> {
    let index = match kept {
        Some(i) => i,
        None => {
            let Some(f) = slots.open_for_read(active) else { return Ok(HashMap::new()) };
            if f.metadata().map(|m| m.len()).unwrap_or(0) == 0 {
                return Ok(HashMap::new());
            }
            Chunker::new(params)
                .workers(std::num::NonZeroUsize::MIN)
                .chunk_reader(std::io::BufReader::with_capacity(crate::slot::READ_BUF, f))
                .map_err(|e| WriteError::Rechunk(e.to_string()))?
                .index
        }
    };
    let mut map = HashMap::new();
    for (offset, e) in index.iter_with_offsets() {
        map.entry(e.id).or_insert((offset, e.len));
    }
    Ok(map)
}

/// Writes the target slot; returns the bytes by source of this run plus earlier runs, and
/// the SHA-256 of the whole image read back from the slot.
///
/// # Errors
/// [`WriteError`]; progress made so far stays recorded.
pub async fn write_slot(plan: WritePlan<'_>) -> Result<Written, WriteError> {
    let target = plan.target;
    let size = plan.index.image_size();
    let io = move |source| WriteError::slot_io(target, size, source);
    let index_id = plan.index.id();
    let file = Arc::new(plan.slots.open_for_write(target, plan.index.image_size()).map_err(|e| match e {
        crate::slot::SlotError::Io { source, .. } => io(source),
        other => WriteError::Io { slot: target, source: std::io::Error::other(other.to_string()) },
    })?);
    let resumed = Progress::load(&plan.progress_path, index_id, target);
    let is_resume = resumed.is_some();
    let mut progress = resumed.unwrap_or_else(|| Progress::new(index_id, target, plan.index.len()));
    let mut bits = progress.bits();
    if !is_resume {
        let _ = std::fs::remove_file(&plan.downloads_log);
        progress.save(&plan.progress_path, &bits).map_err(io)?;
    }
    let mut todo = placement(plan.index, &bits);

    // 1. A resumed install: chunks written after the last checkpoint are found in place.
    if is_resume && !todo.order.is_empty() {
        let (f, order, places) = (file.clone(), todo.order.clone(), todo.places.clone());
        let found: Vec<(usize, ChunkId)> = tokio::task::spawn_blocking(move || {
            let mut found = Vec::new();
            let mut buf = Vec::new();
            for id in order {
                let (len, at) = &places[&id];
                buf.resize(*len as usize, 0);
                for (i, offset) in at {
                    if f.read_exact_at(&mut buf, *offset).is_ok() && ChunkId::of(&buf) == id {
                        found.push((*i, id));
                    }
                }
            }
            found
        })
        .await
        .map_err(|e| WriteError::Task(e.to_string()))?;
        for (i, _) in &found {
            journal::set_done(&mut bits, *i);
        }
        tracing::info!(chunks = found.len(), "resumed: chunks already in the target slot");
        todo = placement(plan.index, &bits);
    }

    let phases = Arc::new(Phases::default());
    let read_back = ReadBack::start(plan.slots.image_path(target), file.clone(), phases.clone());
    let mut frontier = Frontier::default();

    // 2. Reuse from the active slot.
    if let Some((active, kept)) = plan.active
        && !todo.order.is_empty()
    {
        let slots = plan.slots.clone();
        let params = plan.index.params();
        let map = tokio::task::spawn_blocking(move || active_map(&slots, active, kept, params))
            .await
            .map_err(|e| WriteError::Task(e.to_string()))??;
        let wanted: Vec<(ChunkId, (u64, u32))> =
            todo.order.iter().filter_map(|id| map.get(id).map(|at| (*id, *at))).collect();
        if !wanted.is_empty() {
            let (f, src, places) = (file.clone(), plan.slots.open_for_read(active), todo.places.clone());
            let reused: Vec<(ChunkId, u64)> = tokio::task::spawn_blocking(move || -> std::io::Result<_> {
                let Some(src) = src else { return Ok(Vec::new()) };
                let mut out = Vec::new();
                let mut buf = Vec::new();
                for (id, (offset, len)) in wanted {
                    buf.resize(len as usize, 0);
                    // The active slot is read like any source: a chunk that does not hash
                    // to its id (a damaged or modified slot) is fetched instead.
                    if src.read_exact_at(&mut buf, offset).is_err() || ChunkId::of(&buf) != id {
                        continue;
                    }
                    let at = &places[&id].1;
                    write_all_places(&f, &buf, at)?;
                    out.push((id, u64::from(len) * at.len() as u64));
                }
                Ok(out)
            })
            .await
            .map_err(|e| WriteError::Task(e.to_string()))?
            .map_err(io)?;
            for (id, bytes) in &reused {
                for (i, _) in &todo.places[id].1 {
                    journal::set_done(&mut bits, *i);
                }
                progress.bytes.local += bytes;
            }
            tracing::info!(chunks = reused.len(), bytes = progress.bytes.local, "reused from the active slot");
            let f = file.clone();
            tokio::task::spawn_blocking(move || f.sync_data())
                .await
                .map_err(|e| WriteError::Task(e.to_string()))?
                .map_err(io)?;
            progress.save(&plan.progress_path, &bits).map_err(io)?;
            read_back.advance(frontier.advance(plan.index, &bits));
            todo = placement(plan.index, &bits);
        }
    }

    // 2b. A patch, when it costs fewer bytes than the chunks still missing.
    if let Some(delta) = &plan.delta
        && !todo.order.is_empty()
    {
        let cost = todo.order.iter().map(|id| u64::from(todo.places[id].0)).sum();
        let fetching = crate::delta::Fetching {
            source: plan.source.clone(),
            downloads_log: plan.downloads_log.clone(),
            parallel: plan.parallel,
            attempts: plan.attempts,
            max_rate: plan.max_rate,
        };
        let state = crate::delta::SlotState {
            file: &file,
            slot: target,
            progress: &mut progress,
            bits: &mut bits,
            progress_path: &plan.progress_path,
        };
        crate::delta::install_from_patch(delta, plan.slots, plan.index, cost, &fetching, state).await?;
        read_back.advance(frontier.advance(plan.index, &bits));
        todo = placement(plan.index, &bits);
    }

    // 3. Fetch the rest.
    let started = Instant::now();
    let cap = plan.max_rate.map(|rate| Arc::new(RateCap::new(rate)));
    let mut tasks = tokio::task::JoinSet::new();
    let mut since_checkpoint = 0u64;
    let mut last_checkpoint = Instant::now();
    // Two lanes: the chunks this agent fetches from the origin for its site, and the rest
    // (everything, without a mesh), each with its own fetches in flight, so the chunks
    // peers fetched arrive while this agent's own origin share is still coming in.
    let mut order = todo.order;
    let own = match &plan.source {
        ChunkSource::Peer(p) => p.origin_first(&mut order).await,
        // Without a mesh every chunk is this agent's to fetch.
        _ => order.len(),
    };
    let rest = order.split_off(own);
    let mut lanes = [Lane::new(order, plan.parallel), Lane::new(rest, plan.parallel * PEER_LANE_FACTOR)];
    let mut outcome: Result<(), WriteError> = Ok(());
    let mut in_flight = None;
    let image = Arc::new(plan.slots.image_path(plan.target));
    loop {
        // Keep each lane's fetches in flight without spawning one task per chunk up front.
        for (lane_no, lane) in lanes.iter_mut().enumerate() {
            while outcome.is_ok() && lane.spawned < lane.width * 2 {
                let Some(id) = lane.pending.next() else { break };
                lane.spawned += 1;
                let (len, places) = todo.places[&id].clone();
                let (source, file, image, cap, sem, log, phases) = (
                    plan.source.clone(),
                    file.clone(),
                    image.clone(),
                    cap.clone(),
                    lane.sem.clone(),
                    plan.downloads_log.clone(),
                    phases.clone(),
                );
                let attempts = plan.attempts;
                tasks.spawn(async move {
                    let done = async {
                        let _permit = sem.acquire_owned().await.map_err(|e| WriteError::Task(e.to_string()))?;
                        if let Some(cap) = &cap {
                            cap.take(u64::from(len)).await;
                        }
                        let places =
                            fetch_and_write(&source, &id, len, attempts, (&file, target, size, places), &phases)
                                .await?;
                        let from = source.written(&id, &image);
                        journal::log_download(&log, &id, from);
                        crash::point("chunk-written");
                        Ok::<_, WriteError>((len, places, from))
                    };
                    (lane_no, done.await)
                });
            }
        }
        if tasks.is_empty() {
            break;
        }
        let joined = tokio::select! {
            synced = checkpoint_done(&mut in_flight) => {
                in_flight = None;
                let synced = synced.map_err(|e| WriteError::Task(e.to_string()))?.map_err(io)?;
                read_back.advance(frontier.advance(plan.index, &synced));
                continue;
            }
            joined = tasks.join_next() => joined,
        };
        let Some(joined) = joined else { break };
        let joined = joined.map_err(|e| WriteError::Task(e.to_string())).and_then(|(lane, r)| {
            lanes[lane].spawned -= 1;
            r
        });
        match joined {
            Ok((len, places, from)) => {
                for (i, _) in &places {
                    journal::set_done(&mut bits, *i);
                }
                let fetched = u64::from(len);
                let copies = fetched * (places.len() as u64 - 1);
                match from {
                    "file" => progress.bytes.file += fetched,
                    "peer" => progress.bytes.peer += fetched,
                    _ => progress.bytes.cdn += fetched,
                }
                progress.bytes.local += copies;
                since_checkpoint += fetched + copies;
                // One checkpoint at a time, beside the fetches.
                if in_flight.is_none()
                    && (since_checkpoint >= CHECKPOINT_BYTES || last_checkpoint.elapsed() >= CHECKPOINT_INTERVAL)
                {
                    let path = plan.progress_path.clone();
                    in_flight = Some(checkpoint(file.clone(), progress.clone(), bits.clone(), path, phases.clone()));
                    since_checkpoint = 0;
                    last_checkpoint = Instant::now();
                }
            }
            Err(e) => {
                if outcome.is_ok() {
                    outcome = Err(e);
                }
            }
        }
    }
    // Whatever happened, what was written and verified is synced and recorded.
    if let Some(h) = in_flight.take() {
        h.await.map_err(|e| WriteError::Task(e.to_string()))?.map_err(io)?;
    }
    let path = plan.progress_path.clone();
    let synced = checkpoint(file.clone(), progress.clone(), bits, path, phases.clone())
        .await
        .map_err(|e| WriteError::Task(e.to_string()))?
        .map_err(io)?;
    outcome?;
    read_back.advance(frontier.advance(plan.index, &synced));
    let tail = Instant::now();
    let sha256 = read_back.finish(plan.index.image_size()).await.map_err(io)?;
    tracing::info!(
        wall_ms = started.elapsed().as_millis() as u64,
        tail_ms = tail.elapsed().as_millis() as u64,
        fetch_ms = Phases::ms(&phases.fetch),
        verify_ms = Phases::ms(&phases.verify),
        write_ms = Phases::ms(&phases.write),
        sync_ms = Phases::ms(&phases.sync),
        hash_ms = Phases::ms(&phases.hash),
        "install phases (busy time summed over parallel tasks)"
    );
    if let ChunkSource::Peer(p) = &plan.source {
        p.log_stats().await;
    }
    Ok(Written { bytes: progress.bytes, sha256 })
}

/// The peer lane's fetches in flight, as a multiple of `parallel`: most of them wait for a
/// peer to get the chunk from the origin, which costs nothing but a timer.
const PEER_LANE_FACTOR: usize = 4;

/// Chunks fetched together with their own limit of fetches in flight.
struct Lane {
    pending: std::vec::IntoIter<ChunkId>,
    sem: Arc<tokio::sync::Semaphore>,
    /// Fetches at a time (tasks spawned: twice that, so the next one is ready).
    width: usize,
    spawned: usize,
}

impl Lane {
    fn new(chunks: Vec<ChunkId>, width: usize) -> Self {
        let width = width.max(1);
        Self { pending: chunks.into_iter(), sem: Arc::new(tokio::sync::Semaphore::new(width)), width, spawned: 0 }
    }
}

/// Fetches a chunk, verifies it and writes it at its places, retrying with backoff; decoding,
/// verifying and writing share one blocking call. Returns the places.
pub(crate) async fn fetch_and_write(
    source: &ChunkSource,
    id: &ChunkId,
    len: u32,
    attempts: u32,
    (file, slot, size, places): (&Arc<File>, SlotName, u64, Vec<(usize, u64)>),
    phases: &Arc<Phases>,
) -> Result<Vec<(usize, u64)>, WriteError> {
    let mut attempt = 0;
    let mut places = places;
    loop {
        attempt += 1;
        let t = Instant::now();
        let fetched = source.fetch(id, len).await;
        Phases::add(&phases.fetch, t);
        let last: Result<(), WriteError> = match fetched {
            Ok(got) => {
                let (id2, ph, f) = (*id, phases.clone(), file.clone());
                let (verified, back, object) = tokio::task::spawn_blocking(move || {
                    let t = Instant::now();
                    let (data, object) = match got {
                        // Checked by the mesh against the id; the length is the index's.
                        Got::Verified(data) if data.len() == len as usize => (data, None),
                        Got::Verified(_) => return (Ok(Err(object::ObjectError::Empty)), places, None),
                        Got::Object(obj) => match object::decode(&obj, &id2, len) {
                            Ok(data) => (data, Some(obj)),
                            Err(e) => return (Ok(Err(e)), places, None),
                        },
                    };
                    Phases::add(&ph.verify, t);
                    crash::point("chunk-fetched");
                    let t = Instant::now();
                    let written = write_all_places(&f, &data, &places);
                    Phases::add(&ph.write, t);
                    (written.map(Ok), places, object)
                })
                .await
                .map_err(|e| WriteError::Task(e.to_string()))?;
                places = back;
                if let (Some(object), ChunkSource::Peer(p)) = (&object, source) {
                    // Decoded to the chunk above: peers may be served these very bytes.
                    p.verified_object(id, object);
                }
                match verified.map_err(|source| WriteError::slot_io(slot, size, source))? {
                    Ok(()) => return Ok(places),
                    Err(source) => {
                        tracing::warn!(chunk = %id, attempt, error = %source, "chunk failed verification; dropped");
                        Err(WriteError::BadChunk { id: *id, attempts: attempt, source })
                    }
                }
            }
            Err(FetchError::Client(source)) => {
                let transient = source.is_transient();
                let e = WriteError::Unavailable { id: *id, attempts: attempt, source };
                if !transient {
                    return Err(e);
                }
                tracing::warn!(chunk = %id, attempt, error = %e, "chunk fetch failed; retrying");
                Err(e)
            }
            Err(FetchError::Export(source)) => return Err(WriteError::ExportChunk { id: *id, source }),
        };
        if attempt >= attempts {
            return last.map(|()| places);
        }
        tokio::time::sleep(backoff(attempt)).await;
    }
}

/// Reads a kept index file, if it decodes.
pub fn read_kept_index(path: &Path) -> Option<ChunkIndex> {
    std::fs::read(path).ok().and_then(|b| ChunkIndex::decode(&b).ok())
}
