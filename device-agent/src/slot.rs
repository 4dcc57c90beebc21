//! The two A/B slots: where an image is written, read back and (for bundles) unpacked.
//!
//! - `file`: two image files; a raw image is written to the file as is.
//! - `dir`: app bundles. The image (a deterministic tar) is written to `<root>/a.tar` or
//!   `<root>/b.tar`, verified there, then unpacked with core's safe unpacker into `<root>/a/`
//!   or `<root>/b/`; `<root>/current` is the symlink an app loads its bundle through.
//! - `block`: two partitions (or any block devices, e.g. loop devices). Never created or
//!   truncated: the image is written over the start of the device, whose size is read from
//!   the device itself (`lseek(SEEK_END)`: no ioctl, no `unsafe`), and an image larger than
//!   the device is refused before a byte is written. Only raw images fit a partition.
//!
//! Read-back: a slot is hashed for the switch from what the media returns, not from what the
//! writer left in memory ([`MediaReader`]): read with `O_DIRECT` (after `fdatasync`), which
//! bypasses the page cache and leaves it as it is for the peers served from the slot; where
//! the file system refuses `O_DIRECT` (tmpfs), the range's cached pages are dropped first
//! (`posix_fadvise(POSIX_FADV_DONTNEED)`, [`drop_cached`]) and it is read through the cache.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};

use flotilla_core::archive::{self, UnpackLimits};
use flotilla_core::ids::Sha256Digest;
use flotilla_core::manifest::PayloadKind;
use serde::{Deserialize, Serialize};
use sha2::Digest as _;

use crate::config::SlotsConfig;
use crate::durable::fsync_dir;

/// Bytes read per step when hashing or re-chunking a slot.
pub const READ_BUF: usize = 1 << 20;

/// Slot errors.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SlotError {
    /// I/O on a slot.
    #[error("slot {slot}: {path}: {source}")]
    Io {
        /// The slot.
        slot: SlotName,
        /// The file.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// The bundle archive did not unpack.
    #[error("slot {slot}: unpacking the bundle: {source}")]
    Unpack {
        /// The slot.
        slot: SlotName,
        /// The cause.
        source: archive::ArchiveError,
    },
    /// The image is larger than the block device of the slot.
    #[error("slot {slot}: {path} holds {device} bytes, the image needs {image}; refusing to write it")]
    TooSmall {
        /// The slot.
        slot: SlotName,
        /// The device.
        path: PathBuf,
        /// Its size.
        device: u64,
        /// The image size.
        image: u64,
    },
    /// The slot's payload kind does not fit the slot type.
    #[error("a {kind:?} payload cannot be installed into {slots} slots")]
    WrongKind {
        /// The payload kind.
        kind: PayloadKind,
        /// The slot type.
        slots: &'static str,
    },
}

/// One of the two slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum SlotName {
    /// Slot A.
    A,
    /// Slot B.
    B,
}

impl SlotName {
    /// The other slot.
    pub fn other(self) -> Self {
        match self {
            Self::A => Self::B,
            Self::B => Self::A,
        }
    }

    /// `A` or `B` (bootloader variable spelling).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::A => "A",
            Self::B => "B",
        }
    }

    /// `a` or `b` (file names).
    pub fn lower(self) -> &'static str {
        match self {
            Self::A => "a",
            Self::B => "b",
        }
    }

    /// Parses `A`/`B` (any case).
    pub fn parse(s: &str) -> Option<Self> {
        match s.trim() {
            "A" | "a" => Some(Self::A),
            "B" | "b" => Some(Self::B),
            _ => None,
        }
    }
}

impl std::fmt::Display for SlotName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The configured slots.
#[derive(Debug, Clone)]
pub enum Slots {
    /// Two image files.
    File {
        /// Slot A.
        a: PathBuf,
        /// Slot B.
        b: PathBuf,
    },
    /// Bundle directories under a root.
    Dir {
        /// The root.
        root: PathBuf,
    },
    /// Two block devices (partitions).
    Block {
        /// Slot A's device.
        a: PathBuf,
        /// Slot B's device.
        b: PathBuf,
    },
}

impl Slots {
    /// From the config.
    pub fn from_config(c: &SlotsConfig) -> Self {
        match c {
            SlotsConfig::File { a, b } => Self::File { a: a.clone(), b: b.clone() },
            SlotsConfig::Dir { root } => Self::Dir { root: root.clone() },
            SlotsConfig::Block { a, b } => Self::Block { a: a.clone(), b: b.clone() },
        }
    }

    /// `file`, `dir` or `block`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::File { .. } => "file",
            Self::Dir { .. } => "dir",
            Self::Block { .. } => "block",
        }
    }

    /// The file an image is written to and verified in.
    pub fn image_path(&self, slot: SlotName) -> PathBuf {
        match (self, slot) {
            (Self::File { a, .. } | Self::Block { a, .. }, SlotName::A) => a.clone(),
            (Self::File { b, .. } | Self::Block { b, .. }, SlotName::B) => b.clone(),
            (Self::Dir { root }, s) => root.join(format!("{}.tar", s.lower())),
        }
    }

    /// The unpacked bundle of a `dir` slot.
    pub fn bundle_dir(&self, slot: SlotName) -> Option<PathBuf> {
        match self {
            Self::Dir { root } => Some(root.join(slot.lower())),
            Self::File { .. } | Self::Block { .. } => None,
        }
    }

    /// The pointer an app loads its bundle through (`dir` slots).
    pub fn current_link(&self) -> Option<PathBuf> {
        match self {
            Self::Dir { root } => Some(root.join("current")),
            Self::File { .. } | Self::Block { .. } => None,
        }
    }

    /// Refuses payloads the slot type cannot take.
    ///
    /// # Errors
    /// [`SlotError::WrongKind`].
    pub fn check_kind(&self, kind: PayloadKind) -> Result<(), SlotError> {
        match (self, kind) {
            (Self::Dir { .. }, PayloadKind::Raw) => Err(SlotError::WrongKind { kind, slots: "dir" }),
            (Self::Block { .. }, PayloadKind::Archive) => Err(SlotError::WrongKind { kind, slots: "block" }),
            _ => Ok(()),
        }
    }

    /// Opens a slot's image for writing at offsets, sized to `size`. Existing bytes are kept
    /// (a resumed install finds what it wrote before). A block device is opened as it is:
    /// never created nor truncated, and refused when smaller than `size`.
    ///
    /// # Errors
    /// I/O, [`SlotError::TooSmall`].
    pub fn open_for_write(&self, slot: SlotName, size: u64) -> Result<File, SlotError> {
        let path = self.image_path(slot);
        let io = |source| SlotError::Io { slot, path: path.clone(), source };
        if let Self::Block { .. } = self {
            let mut f = OpenOptions::new().read(true).write(true).open(&path).map_err(io)?;
            let device = device_size(&mut f).map_err(io)?;
            if size > device {
                return Err(SlotError::TooSmall { slot, path, device, image: size });
            }
            return Ok(f);
        }
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).map_err(io)?;
        }
        let f = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path).map_err(io)?;
        if f.metadata().map_err(io)?.len() != size {
            f.set_len(size).map_err(io)?;
        }
        Ok(f)
    }

    /// Opens a slot's image for reading, if it exists.
    pub fn open_for_read(&self, slot: SlotName) -> Option<File> {
        File::open(self.image_path(slot)).ok()
    }

    /// SHA-256 of the first `size` bytes of a slot, read back from the file.
    ///
    /// # Errors
    /// I/O, including a slot shorter than `size`.
    pub fn hash_image(&self, slot: SlotName, size: u64) -> Result<Sha256Digest, SlotError> {
        let path = self.image_path(slot);
        let io = |source| SlotError::Io { slot, path: path.clone(), source };
        let f = File::open(&path).map_err(io)?;
        let mut sha = sha2::Sha256::new();
        MediaReader::open(&path, std::sync::Arc::new(f)).read(0, size, &mut |b| sha.update(b)).map_err(io)?;
        Ok(Sha256Digest::from_bytes(sha.finalize().into()))
    }

    /// Reads `buf.len()` bytes at `offset` of a slot's image.
    ///
    /// # Errors
    /// I/O.
    pub fn read_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
        file.read_exact_at(buf, offset)
    }

    /// Makes a verified image usable: unpacks a bundle (`dir`), syncing it before the
    /// directory is renamed into place. Nothing to do for `file` slots.
    ///
    /// # Errors
    /// I/O or an archive the safe unpacker refuses.
    pub fn finalize(&self, slot: SlotName) -> Result<(), SlotError> {
        let Self::Dir { root } = self else { return Ok(()) };
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| SlotError::Io { slot, path, source }
        };
        let staging = root.join(format!("{}.unpacking", slot.lower()));
        let dest = root.join(slot.lower());
        if staging.exists() {
            fs::remove_dir_all(&staging).map_err(io(&staging))?;
        }
        let tar = self.image_path(slot);
        let f = File::open(&tar).map_err(io(&tar))?;
        archive::unpack(io::BufReader::new(f), &staging, UnpackLimits::default())
            .map_err(|source| SlotError::Unpack { slot, source })?;
        sync_tree(&staging).map_err(io(&staging))?;
        if dest.exists() {
            fs::remove_dir_all(&dest).map_err(io(&dest))?;
        }
        fs::rename(&staging, &dest).map_err(io(&dest))?;
        fsync_dir(root).map_err(io(root))?;
        Ok(())
    }
}

/// The size of an open file or block device: where its end is (`lseek(SEEK_END)`; a block
/// device's length is not in its metadata). The position is put back to the start.
///
/// # Errors
/// I/O.
pub fn device_size(f: &mut File) -> io::Result<u64> {
    use std::io::{Seek as _, SeekFrom};
    let end = f.seek(SeekFrom::End(0))?;
    f.seek(SeekFrom::Start(0))?;
    Ok(end)
}

/// Alignment of `O_DIRECT` reads (offset, length and buffer): the largest logical block size
/// in use, which also suits 512-byte devices.
const DIRECT_ALIGN: usize = 4096;

/// Reads a slot's bytes as the media returns them (see the module's doc): `O_DIRECT` when the
/// file system takes it, else the buffered file after dropping the range's cached pages.
pub struct MediaReader {
    direct: Option<File>,
    buffered: std::sync::Arc<File>,
    /// [`READ_BUF`] bytes at an aligned address start at `start`.
    buf: Vec<u8>,
    start: usize,
}

impl std::fmt::Debug for MediaReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MediaReader").field("direct", &self.direct.is_some()).finish_non_exhaustive()
    }
}

impl MediaReader {
    /// A reader of the file at `path`, of which `buffered` is an open handle (the fallback).
    pub fn open(path: &Path, buffered: std::sync::Arc<File>) -> Self {
        use std::os::unix::fs::OpenOptionsExt as _;
        let direct = match i32::try_from(rustix::fs::OFlags::DIRECT.bits())
            .map_err(io::Error::other)
            .and_then(|flags| OpenOptions::new().read(true).custom_flags(flags).open(path))
        {
            Ok(f) => Some(f),
            Err(e) => {
                tracing::debug!(path = %path.display(), error = %e, "no O_DIRECT; the read-back drops cached pages instead");
                None
            }
        };
        let buf = vec![0u8; READ_BUF + DIRECT_ALIGN];
        let start = buf.as_ptr().align_offset(DIRECT_ALIGN).min(DIRECT_ALIGN);
        Self { direct, buffered, buf, start }
    }

    /// Feeds bytes `pos..end` of the file, read from the media, to `sink`, in order. The range
    /// must be synced (`fdatasync`) before.
    ///
    /// # Errors
    /// I/O; `UnexpectedEof` when the file ends before `end`.
    pub fn read(&mut self, mut pos: u64, end: u64, sink: &mut impl FnMut(&[u8])) -> io::Result<()> {
        let align = DIRECT_ALIGN as u64;
        while pos < end {
            if let Some(direct) = &self.direct {
                // Whole aligned blocks around the range; only the range is fed.
                let block = pos - pos % align;
                let skip = (pos - block) as usize;
                let want = usize::try_from(end - block).unwrap_or(usize::MAX).min(READ_BUF);
                let len = want.next_multiple_of(DIRECT_ALIGN).min(READ_BUF);
                let buf = &mut self.buf[self.start..][..len];
                match direct.read_at(buf, block) {
                    Ok(n) if n > skip => {
                        let usable = n.min(want);
                        sink(&buf[skip..usable]);
                        pos = block + usable as u64;
                    }
                    Ok(_) => {
                        return Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            format!("the slot ends at {pos} bytes, before {end}"),
                        ));
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    // The media failed: no other way to read it would be better.
                    Err(e) if e.raw_os_error() == Some(rustix::io::Errno::IO.raw_os_error()) => return Err(e),
                    Err(e) => {
                        // An alignment this file does not take (EINVAL), a file system that
                        // opens with O_DIRECT but will not read so (EOPNOTSUPP): read
                        // through the cache.
                        tracing::debug!(error = %e, "O_DIRECT read refused; the read-back drops cached pages instead");
                        self.direct = None;
                    }
                }
                continue;
            }
            drop_cached(&self.buffered, pos, end - pos);
            let buf = &mut self.buf[..READ_BUF];
            while pos < end {
                let n = usize::try_from(end - pos).unwrap_or(usize::MAX).min(buf.len());
                self.buffered.read_exact_at(&mut buf[..n], pos)?;
                sink(&buf[..n]);
                pos += n as u64;
            }
        }
        Ok(())
    }
}

/// Drops the page cache of `len` bytes at `offset` of `f` (`POSIX_FADV_DONTNEED`), so the next
/// read comes from the media. Only clean pages are dropped: call it after `fdatasync`. It is
/// advice: where the kernel ignores it (tmpfs keeps everything in memory anyway) nothing
/// breaks, and a failure is logged, not fatal.
pub fn drop_cached(f: &File, offset: u64, len: u64) {
    let Some(len) = std::num::NonZeroU64::new(len) else { return };
    if let Err(e) = rustix::fs::fadvise(f, offset, Some(len), rustix::fs::Advice::DontNeed) {
        tracing::debug!(error = %e, "posix_fadvise(DONTNEED) failed; the read-back may come from the page cache");
    }
}

/// Fsyncs every file and directory under `dir` (bottom-up is not needed: each is synced).
fn sync_tree(dir: &Path) -> io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let ft = entry.file_type()?;
        if ft.is_dir() {
            sync_tree(&entry.path())?;
        } else if ft.is_file() {
            File::open(entry.path())?.sync_all()?;
        }
    }
    fsync_dir(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_slot_write_and_hash() {
        let dir = tempfile::tempdir().unwrap();
        let slots = Slots::File { a: dir.path().join("a"), b: dir.path().join("b") };
        let f = slots.open_for_write(SlotName::B, 5).unwrap();
        f.write_all_at(b"hello", 0).unwrap();
        assert_eq!(slots.hash_image(SlotName::B, 5).unwrap(), Sha256Digest::of(b"hello"));
        assert!(slots.hash_image(SlotName::B, 6).is_err());
        assert_eq!(SlotName::A.other(), SlotName::B);
    }

    #[test]
    fn media_reader_feeds_exactly_the_ranges_asked_for() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("slot.img");
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let data: Vec<u8> = (0..(3 * READ_BUF + 12_345))
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        std::fs::write(&path, &data).unwrap();
        let file = std::sync::Arc::new(File::open(&path).unwrap());
        // Unaligned ends, a range longer than the buffer, one inside a block, up to the end.
        let cuts = [0, 1, 4095, 4097, 70_000, 70_001, 2 * READ_BUF + 3, data.len() - 1, data.len()];
        for direct in [true, false] {
            let mut reader = MediaReader::open(&path, file.clone());
            if direct {
                assert!(
                    reader.direct.is_some(),
                    "the temporary directory must be on a file system that takes O_DIRECT"
                );
            } else {
                reader.direct = None;
            }
            let mut got = Vec::new();
            for w in cuts.windows(2) {
                let before = got.len();
                reader.read(w[0] as u64, w[1] as u64, &mut |b| got.extend_from_slice(b)).unwrap();
                assert_eq!(got.len() - before, w[1] - w[0], "direct {direct}: range {w:?}");
            }
            assert!(got == data, "direct {direct}: the bytes fed are the file's");
            let e = reader.read(data.len() as u64 - 10, data.len() as u64 + 10, &mut |_| {}).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "direct {direct}");
        }
    }
}
