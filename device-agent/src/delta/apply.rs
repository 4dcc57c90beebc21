//! Step 3 of a patch install: the codec's output cut at the new index's chunk boundaries,
//! each chunk verified before it is written at its offset in the target slot, the slot synced
//! before the progress record claims it.

use std::fs::File;
use std::io::{BufReader, Write};
use std::os::unix::fs::FileExt as _;
use std::path::Path;
use std::sync::Arc;

use flotilla_core::delta::{self as codec, DeltaLimits, OldImage};
use flotilla_core::ids::ChunkId;
use flotilla_core::index::{ChunkIndex, IndexEntry};

use super::{Outcome, PatchError, SlotState};
use crate::crash;
use crate::install::WriteError;
use crate::journal::{self, Progress};
use crate::slot::{SlotName, Slots};

/// Sync the target slot and record progress after this many bytes of patch output.
const APPLY_CHECKPOINT_BYTES: u64 = 64 << 20;
/// Read buffer over the patch file (the codec reads it sequentially).
const PATCH_READ_BUF: usize = 256 << 10;

/// The active slot as the codec's old image: exactly the installed image's bytes (a block
/// partition is larger than the image it holds).
struct SlotImage {
    file: File,
    size: u64,
}

impl OldImage for SlotImage {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let end = offset.checked_add(buf.len() as u64);
        if end.is_none_or(|e| e > self.size) {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "read past the old image"));
        }
        self.file.read_exact_at(buf, offset)
    }
}

/// Applies the patch into the target slot on a blocking thread.
pub(super) async fn apply(
    slots: &Slots,
    active: SlotName,
    old_size: u64,
    index: &ChunkIndex,
    patch_file: Arc<File>,
    slot: &mut SlotState<'_>,
) -> Result<(), Outcome> {
    let old = slots.open_for_read(active).ok_or_else(|| {
        let source = std::io::Error::new(std::io::ErrorKind::NotFound, "the slot's image is missing");
        Outcome::Patch(PatchError::ActiveSlot { slot: active, source })
    })?;
    let entries: Vec<IndexEntry> = index.entries().to_vec();
    let size = index.image_size();
    let (file, mut progress, mut bits, path) =
        (slot.file.clone(), slot.progress.clone(), slot.bits.clone(), slot.progress_path.to_path_buf());
    let (result, bits, progress) = tokio::task::spawn_blocking(move || {
        let old = SlotImage { file: old, size: old_size };
        let mut reader = BufReader::with_capacity(PATCH_READ_BUF, PatchReader { file: &patch_file, pos: 0 });
        let mut cutter = Cutter::new(&file, &entries, &mut bits, &mut progress, &path);
        let applied = codec::apply(&mut reader, &old, &mut cutter, &DeltaLimits::default());
        let result = cutter.finish(applied, size);
        (result, bits, progress)
    })
    .await
    .map_err(|e| Outcome::Slot(WriteError::Task(e.to_string())))?;
    *slot.bits = bits;
    *slot.progress = progress;
    let target = slot.slot;
    result.map_err(|e| match e {
        Finish::Slot(source) => Outcome::Slot(WriteError::slot_io(target, size, source)),
        Finish::Patch(p) => Outcome::Patch(p),
    })
}

/// Reads the patch file sequentially through positioned reads (the file is shared).
struct PatchReader<'a> {
    file: &'a File,
    pos: u64,
}

impl std::io::Read for PatchReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = std::os::unix::fs::FileExt::read_at(self.file, buf, self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

enum Finish {
    Slot(std::io::Error),
    Patch(PatchError),
}

/// The codec's output sink: cuts the new image at the index's chunk boundaries, verifies
/// each chunk and writes it at its offset; checkpoints (sync, then the progress record)
/// every [`APPLY_CHECKPOINT_BYTES`]. Chunks already claimed done are not written again.
struct Cutter<'a> {
    file: &'a File,
    entries: &'a [IndexEntry],
    bits: &'a mut Vec<u8>,
    progress: &'a mut Progress,
    path: &'a Path,
    next: usize,
    offset: u64,
    buf: Vec<u8>,
    /// Entries written since the last checkpoint (not claimed yet).
    fresh: Vec<usize>,
    since_sync: u64,
    /// Why writing stopped, when it was the cutter's own check.
    stopped: Option<Finish>,
}

impl<'a> Cutter<'a> {
    fn new(
        file: &'a File,
        entries: &'a [IndexEntry],
        bits: &'a mut Vec<u8>,
        progress: &'a mut Progress,
        path: &'a Path,
    ) -> Self {
        Self {
            file,
            entries,
            bits,
            progress,
            path,
            next: 0,
            offset: 0,
            buf: Vec::new(),
            fresh: Vec::new(),
            since_sync: 0,
            stopped: None,
        }
    }

    fn stop(&mut self, why: Finish) -> std::io::Error {
        let msg = match &why {
            Finish::Slot(e) => e.to_string(),
            Finish::Patch(p) => p.to_string(),
        };
        self.stopped = Some(why);
        std::io::Error::other(msg)
    }

    fn checkpoint(&mut self) -> std::io::Result<()> {
        if self.fresh.is_empty() {
            return Ok(());
        }
        self.file.sync_data()?;
        for i in self.fresh.drain(..) {
            journal::set_done(self.bits, i);
        }
        self.progress.save(self.path, self.bits)?;
        self.since_sync = 0;
        Ok(())
    }

    fn chunk_done(&mut self) -> std::io::Result<()> {
        let e = self.entries[self.next];
        if !journal::is_done(self.bits, self.next) {
            let actual = ChunkId::of(&self.buf);
            if actual != e.id {
                let why = PatchError::ChunkMismatch { entry: self.next, expected: e.id, actual };
                return Err(self.stop(Finish::Patch(why)));
            }
            if let Err(err) = self.file.write_all_at(&self.buf, self.offset) {
                return Err(self.stop(Finish::Slot(err)));
            }
            self.fresh.push(self.next);
            self.since_sync += u64::from(e.len);
            crash::point("patch-chunk-written");
            if self.since_sync >= APPLY_CHECKPOINT_BYTES
                && let Err(err) = self.checkpoint()
            {
                return Err(self.stop(Finish::Slot(err)));
            }
        }
        self.offset += u64::from(e.len);
        self.next += 1;
        self.buf.clear();
        Ok(())
    }

    /// The outcome of the apply, after a final checkpoint of what was verified and written.
    fn finish(mut self, applied: Result<u64, codec::DeltaError>, size: u64) -> Result<(), Finish> {
        let synced = self.checkpoint();
        let stopped = self.stopped.take();
        if let Err(e) = synced {
            return Err(Finish::Slot(e));
        }
        match (applied, stopped) {
            (_, Some(why)) => Err(why),
            (Err(e), None) => Err(Finish::Patch(PatchError::Apply(e))),
            (Ok(n), None) if n != size || self.next != self.entries.len() || !self.buf.is_empty() => {
                Err(Finish::Patch(PatchError::Length { produced: n, size }))
            }
            (Ok(_), None) => Ok(()),
        }
    }
}

impl Write for Cutter<'_> {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let mut rest = data;
        while !rest.is_empty() {
            let Some(e) = self.entries.get(self.next) else {
                let produced = self.offset + rest.len() as u64;
                let size = self.offset;
                return Err(self.stop(Finish::Patch(PatchError::Length { produced, size })));
            };
            let len = e.len as usize;
            if self.buf.capacity() < len {
                self.buf.reserve_exact(len - self.buf.len());
            }
            let take = (len - self.buf.len()).min(rest.len());
            self.buf.extend_from_slice(&rest[..take]);
            rest = &rest[take..];
            if self.buf.len() == len {
                self.chunk_done()?;
            }
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
