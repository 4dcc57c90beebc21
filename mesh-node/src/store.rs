//! What a node serves: the [`ChunkProvider`] trait, and [`DiskStore`], the site cache's
//! bounded on-disk chunk store (least recently used chunks go first).
//!
//! A provider only ever answers with chunks of releases its owner verified: the agent's
//! provider reads its slots through the indexes of verified manifests, and the site cache
//! stores only chunks it checked against their id, of releases signed by its trust root
//! (see [`DiskStore::import_export`]).

use std::collections::{BTreeMap, HashMap};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use flotilla_core::ids::{ChunkId, IndexId};
use flotilla_core::manifest::VerifiedManifest;
use flotilla_core::object;
use flotilla_core::time::Timestamp;
use flotilla_core::trust::TrustRoot;

/// A source of chunk objects a node serves to its peers.
///
/// Called on a blocking thread: implementations may read files and hash.
pub trait ChunkProvider: Send + Sync + 'static {
    /// The object (as `flotilla_core::object` encodes it) of chunk `id`, `len` bytes long,
    /// when held for a verified release and intact; `None` otherwise.
    fn object(&self, id: &ChunkId, len: u32) -> Option<Vec<u8>>;

    /// The encoded chunk index `id` of a verified release held; `None` by default.
    fn index(&self, _id: &IndexId) -> Option<Vec<u8>> {
        None
    }

    /// The have-map of release `id`: bit `i` (of byte `i / 8`, least significant bit first)
    /// set when the chunk of index entry `i` is held; `None` (the default) when the release
    /// is unknown.
    fn have_map(&self, _id: &IndexId) -> Option<Vec<u8>> {
        None
    }
}

/// A have-map over `index` with a bit set for each entry whose chunk `has`.
pub fn have_map_of(index: &flotilla_core::index::ChunkIndex, mut has: impl FnMut(&ChunkId) -> bool) -> Vec<u8> {
    let mut bits = vec![0u8; index.len().div_ceil(8).max(1)];
    for (i, e) in index.entries().iter().enumerate() {
        if has(&e.id) {
            bits[i / 8] |= 1 << (i % 8);
        }
    }
    bits
}

/// A provider with nothing to serve (a node that only fetches).
#[derive(Debug, Clone, Copy, Default)]
pub struct NoChunks;

impl ChunkProvider for NoChunks {
    fn object(&self, _: &ChunkId, _: u32) -> Option<Vec<u8>> {
        None
    }
}

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// File system trouble.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A chunk did not verify against its id.
    #[error("chunk {id}: {source}")]
    BadChunk {
        /// The chunk.
        id: ChunkId,
        /// Why.
        source: object::ObjectError,
    },
    /// The export's manifest or index did not verify.
    #[error("export: {0}")]
    Manifest(#[from] flotilla_core::manifest::ManifestError),
    /// The export is not a readable tar.
    #[error("export archive: {0}")]
    Archive(#[from] flotilla_core::archive::ArchiveError),
    /// The export's rollout directive did not verify or names another release.
    #[error("export directive: {0}")]
    Directive(#[from] flotilla_core::rollout::AssignmentError),
}

/// The rollout directive's file in an export and in a store's release directory.
pub const DIRECTIVE_FILE: &str = "directive.json";

fn write_file(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io_err(path))
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io { path: path.to_path_buf(), source }
}

#[derive(Debug, Default)]
struct Lru {
    /// id → (object size, last use).
    entries: HashMap<ChunkId, (u64, u64)>,
    /// last use → id (ticks are unique).
    order: BTreeMap<u64, ChunkId>,
    tick: u64,
    bytes: u64,
}

impl Lru {
    fn touch(&mut self, id: &ChunkId) -> bool {
        let Some((_, used)) = self.entries.get_mut(id) else { return false };
        self.order.remove(used);
        self.tick += 1;
        *used = self.tick;
        self.order.insert(self.tick, *id);
        true
    }

    fn insert(&mut self, id: ChunkId, size: u64) {
        if self.touch(&id) {
            return;
        }
        self.tick += 1;
        self.entries.insert(id, (size, self.tick));
        self.order.insert(self.tick, id);
        self.bytes += size;
    }

    fn remove(&mut self, id: &ChunkId) {
        if let Some((size, used)) = self.entries.remove(id) {
            self.order.remove(&used);
            self.bytes -= size;
        }
    }

    /// The least recently used entry.
    fn oldest(&self) -> Option<ChunkId> {
        self.order.values().next().copied()
    }
}

/// Counters of a [`DiskStore`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Chunks held.
    pub chunks: u64,
    /// Object bytes held.
    pub bytes: u64,
    /// The bound.
    pub max_bytes: u64,
}

/// What an import added.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImportReport {
    /// Product of the release.
    pub product: String,
    /// Its version.
    pub version: String,
    /// Distinct chunks in its index.
    pub chunks: u64,
    /// Chunks newly stored (the rest were there already).
    pub added: u64,
    /// The share of devices of the export's rollout directive, in basis points, when it
    /// carried one: the cache then offers the release to its site.
    pub directive_basis_points: Option<u16>,
}

/// The site cache's chunk store: `<dir>/chunks/ab/<id>` object files, at most `max_bytes` of
/// them; the least recently served or stored go first.
#[derive(Debug)]
pub struct DiskStore {
    dir: PathBuf,
    max_bytes: u64,
    // A std Mutex: held only for map updates, never across I/O or an await.
    lru: Mutex<Lru>,
}

impl DiskStore {
    /// Opens (creating) a store and indexes what it already holds, oldest files first.
    ///
    /// # Errors
    /// [`StoreError::Io`].
    pub fn open(dir: &Path, max_bytes: u64) -> Result<Self, StoreError> {
        let chunks = dir.join("chunks");
        std::fs::create_dir_all(&chunks).map_err(io_err(&chunks))?;
        let mut found = Vec::new();
        for fan in std::fs::read_dir(&chunks).map_err(io_err(&chunks))? {
            let fan = fan.map_err(io_err(&chunks))?.path();
            let Ok(files) = std::fs::read_dir(&fan) else { continue };
            for f in files.flatten() {
                let name = f.file_name();
                let Some(id) = name.to_str().and_then(|n| n.parse::<ChunkId>().ok()) else {
                    // Leftover temporary files of an interrupted write.
                    let _ = std::fs::remove_file(f.path());
                    continue;
                };
                let Ok(meta) = f.metadata() else { continue };
                found.push((meta.modified().ok(), id, meta.len()));
            }
        }
        found.sort();
        let store = Self { dir: dir.to_path_buf(), max_bytes, lru: Mutex::new(Lru::default()) };
        {
            let mut lru = store.lock();
            for (_, id, size) in found {
                lru.insert(id, size);
            }
        }
        store.evict();
        Ok(store)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Lru> {
        self.lru.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn path_of(&self, id: &ChunkId) -> PathBuf {
        let hex = id.to_hex();
        self.dir.join("chunks").join(&hex[..2]).join(hex)
    }

    /// Counters.
    pub fn stats(&self) -> StoreStats {
        let lru = self.lock();
        StoreStats { chunks: lru.entries.len() as u64, bytes: lru.bytes, max_bytes: self.max_bytes }
    }

    /// Whether the store holds `id`.
    pub fn contains(&self, id: &ChunkId) -> bool {
        self.lock().entries.contains_key(id)
    }

    /// Verifies `obj` against `id` and `len` and stores it, evicting the least recently used
    /// chunks beyond the bound.
    ///
    /// # Errors
    /// [`StoreError::BadChunk`] (nothing stored), [`StoreError::Io`].
    pub fn insert(&self, id: &ChunkId, len: u32, obj: &[u8]) -> Result<bool, StoreError> {
        if self.lock().touch(id) {
            return Ok(false);
        }
        object::decode(obj, id, len).map_err(|source| StoreError::BadChunk { id: *id, source })?;
        let path = self.path_of(id);
        let parent = path.parent().unwrap_or(&self.dir).to_path_buf();
        std::fs::create_dir_all(&parent).map_err(io_err(&parent))?;
        let tmp = parent.join(format!(".{}.tmp", id.to_hex()));
        let mut f = std::fs::File::create(&tmp).map_err(io_err(&tmp))?;
        f.write_all(obj).map_err(io_err(&tmp))?;
        drop(f);
        std::fs::rename(&tmp, &path).map_err(io_err(&path))?;
        self.lock().insert(*id, obj.len() as u64);
        self.evict();
        Ok(true)
    }

    fn evict(&self) {
        loop {
            let victim = {
                let mut lru = self.lock();
                if lru.bytes <= self.max_bytes {
                    return;
                }
                let Some(id) = lru.oldest() else { return };
                lru.remove(&id);
                id
            };
            let _ = std::fs::remove_file(self.path_of(&victim));
        }
    }

    /// Imports a `flotilla export` directory or `.tar`: the manifest must verify against
    /// `root` at `now`, the index against the manifest, and each chunk against its id.
    ///
    /// # Errors
    /// [`StoreError`]; chunks verified before the failure stay stored.
    pub fn import_export(&self, export: &Path, root: &TrustRoot, now: Timestamp) -> Result<ImportReport, StoreError> {
        if export.extension().is_some_and(|e| e == "tar") {
            let staging = tempfile::tempdir_in(&self.dir).map_err(io_err(&self.dir))?;
            let file = std::fs::File::open(export).map_err(io_err(export))?;
            flotilla_core::archive::unpack(
                std::io::BufReader::new(file),
                staging.path(),
                flotilla_core::archive::UnpackLimits::default(),
            )?;
            return self.import_export(staging.path(), root, now);
        }
        let manifest_path = export.join("manifest.json");
        let envelope = std::fs::read(&manifest_path).map_err(io_err(&manifest_path))?;
        let m = flotilla_core::manifest::verify_signed(&envelope, root, now)?;
        let directive_path = export.join(DIRECTIVE_FILE);
        let directive = match std::fs::read(&directive_path) {
            Ok(bytes) => {
                let d = flotilla_core::rollout::RolloutDirective::verify(&bytes, root, now)?;
                d.check_agreement(&m)?;
                Some((bytes, d.basis_points))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(io_err(&directive_path)(e)),
        };
        let (mut report, index_bytes) = self.import_verified(export, &m)?;
        // The release is kept (and offered, with a directive) only once all its chunks are in.
        // An older directive of the same release is replaced: the newest import wins.
        self.record_release(&m.manifest().index.id, &envelope, &index_bytes, directive.as_ref().map(|d| &d.0[..]))?;
        report.directive_basis_points = directive.map(|d| d.1);
        Ok(report)
    }

    /// Records release `index` as stored whole: its index and its signed manifest (the
    /// caller verified both and stored every chunk), after which it is served and provided.
    ///
    /// # Errors
    /// [`StoreError::Io`].
    pub fn add_release(&self, index: &IndexId, envelope: &[u8], index_bytes: &[u8]) -> Result<(), StoreError> {
        self.record_release(index, envelope, index_bytes, None)
    }

    fn record_release(
        &self,
        index: &IndexId,
        envelope: &[u8],
        index_bytes: &[u8],
        directive: Option<&[u8]>,
    ) -> Result<(), StoreError> {
        let rel = self.release_dir(index);
        std::fs::create_dir_all(&rel).map_err(io_err(&rel))?;
        write_file(&rel.join("index.bin"), index_bytes)?;
        if let Some(bytes) = directive {
            write_file(&rel.join(DIRECTIVE_FILE), bytes)?;
        }
        // The manifest last: a release directory with a manifest is complete.
        write_file(&rel.join("manifest.json"), envelope)
    }

    /// Whether release `index` is stored whole (imported or prefetched): its manifest is
    /// written last, after its index, so its presence says both are there (serving reads the
    /// index and checks it against its id anyway).
    pub fn has_release(&self, index: &IndexId) -> bool {
        self.release_dir(index).join("manifest.json").is_file()
    }

    fn release_dir(&self, id: &IndexId) -> PathBuf {
        self.dir.join("releases").join(id.to_hex())
    }

    /// The releases stored whole (imported or prefetched), by index id.
    pub fn release_ids(&self) -> Vec<IndexId> {
        let Ok(dirs) = std::fs::read_dir(self.dir.join("releases")) else { return Vec::new() };
        dirs.flatten().filter_map(|d| d.file_name().to_str()?.parse().ok()).filter(|id| self.has_release(id)).collect()
    }

    /// Encoded offers ([`crate::offer`]) of the imported releases that came with a directive
    /// and still verify against `root` at `now`.
    pub fn offers(&self, root: &TrustRoot, now: Timestamp) -> Vec<Vec<u8>> {
        let Ok(dirs) = std::fs::read_dir(self.dir.join("releases")) else { return Vec::new() };
        let mut out = Vec::new();
        for d in dirs.flatten() {
            let (Ok(m), Ok(directive)) =
                (std::fs::read(d.path().join("manifest.json")), std::fs::read(d.path().join(DIRECTIVE_FILE)))
            else {
                continue;
            };
            let Ok(offer) = crate::offer::encode(&m, &directive) else { continue };
            match crate::offer::VerifiedOffer::verify(&offer, root, now) {
                Ok(_) => out.push(offer),
                Err(e) => tracing::warn!(release = %d.path().display(), error = %e, "stored offer no longer verifies"),
            }
        }
        out
    }

    fn import_verified(&self, export: &Path, m: &VerifiedManifest) -> Result<(ImportReport, Vec<u8>), StoreError> {
        let index_path = export.join("index.bin");
        let index_bytes = std::fs::read(&index_path).map_err(io_err(&index_path))?;
        let index = m.check_index(&index_bytes)?;
        let mut report = ImportReport {
            product: m.manifest().product.clone(),
            version: m.manifest().version.to_string(),
            ..ImportReport::default()
        };
        let mut seen = std::collections::HashSet::new();
        for e in index.entries() {
            if !seen.insert(e.id) {
                continue;
            }
            report.chunks += 1;
            let hex = e.id.to_hex();
            let path = export.join("chunks").join(&hex[..2]).join(&hex);
            let size = std::fs::metadata(&path).map_err(io_err(&path))?.len();
            if size > object::max_object_len(e.len) {
                return Err(StoreError::BadChunk { id: e.id, source: object::ObjectError::Empty });
            }
            let obj = std::fs::read(&path).map_err(io_err(&path))?;
            if self.insert(&e.id, e.len, &obj)? {
                report.added += 1;
            }
        }
        Ok((report, index_bytes))
    }
}

impl DiskStore {
    /// The index of a stored release, checked against its id.
    fn stored_index(&self, id: &IndexId) -> Option<Vec<u8>> {
        let bytes = std::fs::read(self.release_dir(id).join("index.bin")).ok()?;
        (IndexId::of(&bytes) == *id).then_some(bytes)
    }
}

impl ChunkProvider for DiskStore {
    fn index(&self, id: &IndexId) -> Option<Vec<u8>> {
        self.stored_index(id)
    }

    fn have_map(&self, id: &IndexId) -> Option<Vec<u8>> {
        let index = flotilla_core::index::ChunkIndex::decode(&self.stored_index(id)?).ok()?;
        let lru = self.lock();
        Some(have_map_of(&index, |c| lru.entries.contains_key(c)))
    }

    fn object(&self, id: &ChunkId, len: u32) -> Option<Vec<u8>> {
        if !self.lock().touch(id) {
            return None;
        }
        let path = self.path_of(id);
        let obj = std::fs::read(&path).ok()?;
        // Re-verified on the way out: a rotten file must not get this node banned by peers.
        if obj.len() as u64 > object::max_object_len(len) || object::decode(&obj, id, len).is_err() {
            tracing::warn!(chunk = %id, "stored chunk is damaged; dropped");
            self.lock().remove(id);
            let _ = std::fs::remove_file(&path);
            return None;
        }
        Some(obj)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(i: u32, len: usize) -> (ChunkId, u32, Vec<u8>) {
        let data: Vec<u8> = (0..len).map(|k| (k as u32).wrapping_mul(2654435761).wrapping_add(i) as u8).collect();
        (ChunkId::of(&data), len as u32, object::encode(&data, 1))
    }

    #[test]
    fn stores_serves_and_evicts_least_recently_used() {
        let dir = tempfile::tempdir().unwrap();
        let cs: Vec<_> = (0..4).map(|i| chunk(i, 1000)).collect();
        let size = cs[0].2.len() as u64;
        let store = DiskStore::open(dir.path(), size * 3).unwrap();
        for (id, len, obj) in &cs[..3] {
            assert!(store.insert(id, *len, obj).unwrap());
        }
        // Use chunk 0, so chunk 1 is the oldest when chunk 3 arrives.
        assert_eq!(store.object(&cs[0].0, cs[0].1).as_deref(), Some(&cs[0].2[..]));
        store.insert(&cs[3].0, cs[3].1, &cs[3].2).unwrap();
        assert!(!store.contains(&cs[1].0));
        assert!(store.contains(&cs[0].0) && store.contains(&cs[2].0) && store.contains(&cs[3].0));
        assert_eq!(store.stats().bytes, size * 3);
        assert_eq!(store.object(&cs[1].0, cs[1].1), None);

        // Reopened, it finds what is on disk.
        drop(store);
        let store = DiskStore::open(dir.path(), size * 3).unwrap();
        assert_eq!(store.stats().chunks, 3);
        // A smaller bound evicts on open.
        drop(store);
        assert_eq!(DiskStore::open(dir.path(), size).unwrap().stats().chunks, 1);
    }

    #[test]
    fn refuses_a_chunk_that_does_not_match_its_id() {
        let dir = tempfile::tempdir().unwrap();
        let store = DiskStore::open(dir.path(), 1 << 20).unwrap();
        let (id, len, _) = chunk(1, 500);
        let (_, _, other) = chunk(2, 500);
        assert!(matches!(store.insert(&id, len, &other), Err(StoreError::BadChunk { .. })));
        assert_eq!(store.stats().chunks, 0);
    }

    #[test]
    fn a_damaged_file_is_dropped_not_served() {
        let dir = tempfile::tempdir().unwrap();
        let store = DiskStore::open(dir.path(), 1 << 20).unwrap();
        let (id, len, obj) = chunk(1, 500);
        store.insert(&id, len, &obj).unwrap();
        let mut bad = obj.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        std::fs::write(store.path_of(&id), bad).unwrap();
        assert_eq!(store.object(&id, len), None);
        assert!(!store.contains(&id));
    }
}
