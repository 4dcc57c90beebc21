//! Step 4 of a patch install: the chosen regions applied one by one from their payloads in
//! the patch file, the output cut at the new index's chunk boundaries, each chunk verified
//! before it is written at its offsets in the target slot, the slot synced before the progress
//! record claims it.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Seek as _, SeekFrom, Write};
use std::os::unix::fs::FileExt as _;
use std::path::Path;
use std::sync::Arc;

use flotilla_core::delta::{self as codec, DeltaLimits, OldImage, PatchHeader, RegionApplier};
use flotilla_core::ids::ChunkId;
use flotilla_core::index::{ChunkIndex, IndexEntry};

use super::plan::Group;
use super::{Outcome, PatchError, SlotState};
use crate::crash;
use crate::install::WriteError;
use crate::journal::{self, Progress};
use crate::slot::{SlotName, Slots};

/// Sync the target slot and record progress after this many bytes of patch output.
const APPLY_CHECKPOINT_BYTES: u64 = 64 << 20;
/// Read buffer over the patch file (the codec reads each payload sequentially).
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

/// Applies the `groups` of `header`'s regions into the target slot on a blocking thread.
pub(super) async fn apply(
    slots: &Slots,
    active: SlotName,
    old_size: u64,
    index: &ChunkIndex,
    (header, groups): (Arc<PatchHeader>, Vec<Group>),
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
        let mut cutter = Cutter::new(&file, &entries, &mut bits, &mut progress, &path);
        let applied = apply_groups(&header, &groups, &old, &patch_file, &mut cutter);
        let result = cutter.finish(applied);
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

/// Each group's regions in table order, each read from its own payload in the patch file (or
/// its slice of the shared stream, read first); a group must end exactly on the chunk boundary
/// it was planned to.
fn apply_groups(
    header: &PatchHeader,
    groups: &[Group],
    old: &SlotImage,
    patch_file: &File,
    cutter: &mut Cutter<'_>,
) -> Result<(), Finish> {
    let refused = |e: codec::DeltaError| Finish::Patch(PatchError::Apply(e));
    let mut applier = RegionApplier::new(header, old, &DeltaLimits::default()).map_err(refused)?;
    let mut reader = BufReader::with_capacity(PATCH_READ_BUF, PatchReader { file: patch_file, pos: 0 });
    // The shared stream first, once, when a chosen region's records are in it.
    if let Some(shared) = header.shared.as_ref().filter(|_| groups.iter().any(|g| g.shared)) {
        reader.seek(SeekFrom::Start(shared.payload_offset)).map_err(|e| refused(codec::DeltaError::ReadPatch(e)))?;
        applier.load_shared(&mut reader).map_err(refused)?;
    }
    for group in groups {
        cutter.seek(group.entries.start, group.new_offset);
        for number in group.regions.clone() {
            let region = usize::try_from(number).ok().and_then(|n| header.regions.get(n));
            let Some(region) = region else {
                return Err(refused(codec::DeltaError::Malformed { reason: "no such region in the table" }));
            };
            // Seeking drops the read-ahead: each payload is read from its own offset.
            reader
                .seek(SeekFrom::Start(region.payload_offset))
                .map_err(|e| refused(codec::DeltaError::ReadPatch(e)))?;
            applier.apply(number, &mut reader, cutter).map_err(refused)?;
        }
        cutter.end_group(group)?;
    }
    Ok(())
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

impl std::io::Seek for PatchReader<'_> {
    fn seek(&mut self, to: SeekFrom) -> std::io::Result<u64> {
        self.pos = match to {
            SeekFrom::Start(p) => Some(p),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
            SeekFrom::End(_) => None,
        }
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "seek outside the patch"))?;
        Ok(self.pos)
    }
}

enum Finish {
    Slot(std::io::Error),
    Patch(PatchError),
}

/// The codec's output sink: cuts the new image at the index's chunk boundaries, verifies
/// each chunk and writes it at its offset and at every other place the image holds it that is
/// still missing; checkpoints (sync, then the progress record) every
/// [`APPLY_CHECKPOINT_BYTES`]. Chunks already claimed done, or written earlier in this run,
/// are not written again.
struct Cutter<'a> {
    file: &'a File,
    entries: &'a [IndexEntry],
    bits: &'a mut Vec<u8>,
    progress: &'a mut Progress,
    path: &'a Path,
    /// Where each chunk still missing at the start goes: id → (entry, offset).
    places: HashMap<ChunkId, Vec<(usize, u64)>>,
    /// Entries written in this run (claimed or not yet).
    written: Vec<u8>,
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
        let mut places: HashMap<ChunkId, Vec<(usize, u64)>> = HashMap::new();
        let mut offset = 0u64;
        for (i, e) in entries.iter().enumerate() {
            if !journal::is_done(bits, i) {
                places.entry(e.id).or_default().push((i, offset));
            }
            offset += u64::from(e.len);
        }
        Self {
            file,
            entries,
            bits,
            progress,
            path,
            places,
            written: vec![0u8; entries.len().div_ceil(8)],
            next: 0,
            offset: 0,
            buf: Vec::new(),
            fresh: Vec::new(),
            since_sync: 0,
            stopped: None,
        }
    }

    /// Moves to a group's first chunk (entry `next`, at `offset` in the image).
    fn seek(&mut self, next: usize, offset: u64) {
        self.next = next;
        self.offset = offset;
        self.buf.clear();
    }

    /// Checks that the group's output ended exactly on its last chunk's end.
    fn end_group(&mut self, group: &Group) -> Result<(), Finish> {
        let lens: u64 =
            self.entries.get(group.entries.clone()).unwrap_or_default().iter().map(|e| u64::from(e.len)).sum();
        let expected = group.new_offset + lens;
        if self.next != group.entries.end || !self.buf.is_empty() {
            let produced = self.offset + self.buf.len() as u64;
            return Err(Finish::Patch(PatchError::Length { produced, size: expected }));
        }
        Ok(())
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

    fn is_held(&self, i: usize) -> bool {
        journal::is_done(self.bits, i) || journal::is_done(&self.written, i)
    }

    fn chunk_done(&mut self) -> std::io::Result<()> {
        let e = self.entries[self.next];
        if !self.is_held(self.next) {
            let actual = ChunkId::of(&self.buf);
            if actual != e.id {
                let why = PatchError::ChunkMismatch { entry: self.next, expected: e.id, actual };
                return Err(self.stop(Finish::Patch(why)));
            }
            // Here, and wherever else the image holds this chunk and still misses it.
            let mut at = vec![(self.next, self.offset)];
            if let Some(more) = self.places.get(&e.id) {
                at.extend(more.iter().filter(|(i, _)| *i != self.next && !self.is_held(*i)));
            }
            for (i, offset) in at {
                if let Err(err) = self.file.write_all_at(&self.buf, offset) {
                    return Err(self.stop(Finish::Slot(err)));
                }
                journal::set_done(&mut self.written, i);
                self.fresh.push(i);
                self.since_sync += u64::from(e.len);
                crash::point("patch-chunk-written");
            }
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
    /// The cutter's own reason to stop wins over the codec's report of the write it refused.
    fn finish(mut self, applied: Result<(), Finish>) -> Result<(), Finish> {
        let synced = self.checkpoint();
        let stopped = self.stopped.take();
        if let Err(e) = synced {
            return Err(Finish::Slot(e));
        }
        match (applied, stopped) {
            (_, Some(why)) => Err(why),
            (applied, None) => applied,
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
