//! Object storage behind one trait: content-addressed keys (`chunks/ab/abcdef…`,
//! `indexes/…`), a filesystem backend by default and an S3-compatible one for production.

use std::io;
use std::path::PathBuf;

/// Kinds of stored object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ObjectKind {
    /// A chunk object.
    Chunk,
    /// A chunk index.
    Index,
}

impl ObjectKind {
    /// Name in keys and in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Chunk => "chunk",
            Self::Index => "index",
        }
    }

    fn dir(self) -> &'static str {
        match self {
            Self::Chunk => "chunks",
            Self::Index => "indexes",
        }
    }
}

/// The key of an object: `chunks/ab/abcdef…`.
pub fn object_key(kind: ObjectKind, id_hex: &str) -> String {
    format!("{}/{}/{}", kind.dir(), &id_hex[..2.min(id_hex.len())], id_hex)
}

/// A stored object, possibly a byte range of it.
#[derive(Debug)]
pub struct Fetched {
    /// Bytes returned.
    pub bytes: Vec<u8>,
    /// Full object size.
    pub total: u64,
}

/// Object storage.
#[allow(async_fn_in_trait)]
pub trait ObjectStore: Send + Sync + 'static {
    /// Stores `bytes` under `key` atomically (readers see all or nothing).
    fn put(&self, key: &str, bytes: Vec<u8>) -> impl std::future::Future<Output = io::Result<()>> + Send;
    /// Reads `key`, optionally a byte range `[start, end)`. `Ok(None)` when missing.
    fn get(
        &self,
        key: &str,
        range: Option<(u64, u64)>,
    ) -> impl std::future::Future<Output = io::Result<Option<Fetched>>> + Send;
}

/// Objects as files under a directory; writes go to a temp file, fsync, rename.
#[derive(Debug, Clone)]
pub struct FsStore {
    root: PathBuf,
}

impl FsStore {
    /// A store rooted at `root` (created if missing).
    ///
    /// # Errors
    /// The directory cannot be created.
    pub fn new(root: impl Into<PathBuf>) -> io::Result<Self> {
        let root = root.into();
        std::fs::create_dir_all(&root)?;
        Ok(Self { root })
    }
}

impl ObjectStore for FsStore {
    async fn put(&self, key: &str, bytes: Vec<u8>) -> io::Result<()> {
        let path = self.root.join(key);
        tokio::task::spawn_blocking(move || {
            let dir = path.parent().ok_or_else(|| io::Error::other("object key has no parent"))?;
            std::fs::create_dir_all(dir)?;
            let tmp = dir.join(format!(".tmp-{}-{}", std::process::id(), rand_suffix()));
            {
                use std::io::Write as _;
                let mut f = std::fs::File::create(&tmp)?;
                f.write_all(&bytes)?;
                f.sync_data()?;
            }
            std::fs::rename(&tmp, &path)?;
            Ok(())
        })
        .await
        .map_err(io::Error::other)?
    }

    async fn get(&self, key: &str, range: Option<(u64, u64)>) -> io::Result<Option<Fetched>> {
        let path = self.root.join(key);
        match tokio::fs::read(&path).await {
            Ok(bytes) => {
                let total = bytes.len() as u64;
                let bytes = match range {
                    Some((start, end)) => bytes[start.min(total) as usize..end.min(total) as usize].to_vec(),
                    None => bytes,
                };
                Ok(Some(Fetched { bytes, total }))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }
}

fn rand_suffix() -> u64 {
    let mut b = [0u8; 8];
    let _ = getrandom::fill(&mut b);
    u64::from_le_bytes(b)
}

/// The configured store (an enum rather than a trait object: the trait's futures are `Send`
/// generics, and there are few backends).
#[derive(Debug, Clone)]
pub enum Storage {
    /// Filesystem.
    Fs(FsStore),
}

impl ObjectStore for Storage {
    async fn put(&self, key: &str, bytes: Vec<u8>) -> io::Result<()> {
        match self {
            Self::Fs(s) => s.put(key, bytes).await,
        }
    }

    async fn get(&self, key: &str, range: Option<(u64, u64)>) -> io::Result<Option<Fetched>> {
        match self {
            Self::Fs(s) => s.get(key, range).await,
        }
    }
}
