//! Step 2 of a patch install: the patch's index, its header and region table, and the patch
//! chunks a plan needs, each verified before it is written into `<state>/patch.bin`, the
//! record claiming them only after the file is synced.

use std::fs::File;
use std::os::unix::fs::FileExt as _;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use flotilla_core::delta::{self as codec, DeltaLimits, HEADER_LEN, PatchHeader};
use flotilla_core::ids::{ChunkId, IndexId};
use flotilla_core::index::ChunkIndex;
use flotilla_core::manifest::Delta;

use super::{DeltaPlan, FETCH_CHECKPOINT_INTERVAL, Fetching, Outcome, PatchError, PatchRecord};
use crate::crash;
use crate::install::WriteError;
use crate::journal;
use crate::slot::SlotName;

pub(super) async fn fetch_index(fetching: &Fetching, delta: &Delta) -> Result<ChunkIndex, Outcome> {
    let id = delta.patch_index.id;
    let refuse = |reason: String| Outcome::Patch(PatchError::Index { id, reason });
    let Some(c) = fetching.source.coordinator() else { return Err(refuse("no coordinator to fetch it from".into())) };
    let bytes = match c.get_bounded(&format!("/v1/indexes/{id}"), delta.patch_index.size).await {
        Ok(b) => b,
        Err(e) if e.is_transient() => return Err(Outcome::Skip(PatchError::Index { id, reason: e.to_string() })),
        Err(e) => return Err(refuse(e.to_string())),
    };
    if bytes.len() as u64 != delta.patch_index.size {
        return Err(refuse(format!("{} bytes, the manifest says {}", bytes.len(), delta.patch_index.size)));
    }
    let actual = IndexId::of(&bytes);
    if actual != id {
        return Err(refuse(format!("hashes to {actual}")));
    }
    let index = ChunkIndex::decode(&bytes).map_err(|e| refuse(e.to_string()))?;
    if index.image_size() != delta.patch_size {
        return Err(refuse(format!(
            "describes {} bytes, the manifest says the patch has {}",
            index.image_size(),
            delta.patch_size
        )));
    }
    Ok(index)
}

pub(super) fn open_patch_file(path: &Path, size: u64) -> std::io::Result<File> {
    let f = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path)?;
    if f.metadata()?.len() != size {
        f.set_len(size)?;
    }
    Ok(f)
}

/// Fetches the patch chunks `wanted` names (one flag per patch index entry) that `record` does
/// not hold yet into the patch file, verified, with the record claiming them only after a sync.
pub(super) async fn fetch_patch(
    plan: &DeltaPlan,
    fetching: &Fetching,
    patch_index: &ChunkIndex,
    patch_file: &Arc<File>,
    record: &mut PatchRecord,
    target: SlotName,
    wanted: &[bool],
) -> Result<(), Outcome> {
    let mut bits = hex::decode(&record.done).unwrap_or_default();
    if bits.len() != patch_index.len().div_ceil(8) {
        bits = vec![0u8; patch_index.len().div_ceil(8)];
        record.fetched = 0;
    }
    // Chunks an interrupted run wrote after its last checkpoint are found in place (hashed),
    // so no verified patch chunk is fetched twice.
    let (f, entries, claimed) = (patch_file.clone(), patch_index.entries().to_vec(), bits.clone());
    let scan = wanted.to_vec();
    let found = tokio::task::spawn_blocking(move || {
        let (mut found, mut buf, mut offset) = (Vec::new(), Vec::new(), 0u64);
        for (i, e) in entries.iter().enumerate() {
            if scan.get(i).copied().unwrap_or(false) && !journal::is_done(&claimed, i) {
                buf.resize(e.len as usize, 0);
                if f.read_exact_at(&mut buf, offset).is_ok() && ChunkId::of(&buf) == e.id {
                    found.push((i, e.len));
                }
            }
            offset += u64::from(e.len);
        }
        found
    })
    .await
    .map_err(|e| Outcome::Slot(WriteError::Task(e.to_string())))?;
    for (i, len) in found {
        journal::set_done(&mut bits, i);
        record.fetched += u64::from(len);
    }
    // Distinct patch chunks still needed, with every place each goes.
    let mut order: Vec<(ChunkId, u32, Vec<(usize, u64)>)> = Vec::new();
    let mut at: std::collections::HashMap<ChunkId, usize> = std::collections::HashMap::new();
    for (i, (offset, e)) in patch_index.iter_with_offsets().enumerate() {
        if journal::is_done(&bits, i) || !wanted.get(i).copied().unwrap_or(false) {
            continue;
        }
        let k = *at.entry(e.id).or_insert_with(|| {
            order.push((e.id, e.len, Vec::new()));
            order.len() - 1
        });
        order[k].2.push((i, offset));
    }
    let record_path = plan.record_path();
    let patch_path = Arc::new(plan.patch_path());
    let slot_io = |source| Outcome::Slot(WriteError::Io { slot: target, source });
    record.save(&record_path, &bits).map_err(slot_io)?;
    let phases = Arc::new(crate::install::Phases::default());
    let cap = fetching.max_rate.map(|rate| Arc::new(crate::install::RateCap::new(rate)));
    let sem = Arc::new(tokio::sync::Semaphore::new(fetching.parallel.max(1)));
    let mut tasks = tokio::task::JoinSet::new();
    let mut pending = order.into_iter();
    let mut failure: Option<WriteError> = None;
    let mut last = Instant::now();
    let size = patch_index.image_size();
    loop {
        while failure.is_none() && tasks.len() < fetching.parallel.max(1) * 2 {
            let Some((id, len, places)) = pending.next() else { break };
            let (f, patch_path, source, sem, phases, log) = (
                patch_file.clone(),
                patch_path.clone(),
                fetching.source.clone(),
                sem.clone(),
                phases.clone(),
                fetching.downloads_log.clone(),
            );
            let (attempts, cap) = (fetching.attempts, cap.clone());
            tasks.spawn(async move {
                let _permit = sem.acquire_owned().await.map_err(|e| WriteError::Task(e.to_string()))?;
                if let Some(cap) = &cap {
                    cap.take(u64::from(len)).await;
                }
                let places =
                    crate::install::fetch_and_write(&source, &id, len, attempts, (&f, target, size, places), &phases)
                        .await?;
                let _ = source.written(&id, &patch_path);
                journal::log_download(&log, &id, "delta");
                crash::point("patch-chunk-fetched");
                Ok::<_, WriteError>((len, places))
            });
        }
        let Some(joined) = tasks.join_next().await else { break };
        match joined.map_err(|e| WriteError::Task(e.to_string())).and_then(|r| r) {
            Ok((len, places)) => {
                for (i, _) in &places {
                    journal::set_done(&mut bits, *i);
                }
                record.fetched += u64::from(len);
                if last.elapsed() >= FETCH_CHECKPOINT_INTERVAL {
                    checkpoint_patch(patch_file, record, &record_path, &bits).await.map_err(slot_io)?;
                    last = Instant::now();
                }
            }
            Err(e) => {
                if failure.is_none() {
                    failure = Some(e);
                }
            }
        }
    }
    checkpoint_patch(patch_file, record, &record_path, &bits).await.map_err(slot_io)?;
    match failure {
        None => Ok(()),
        Some(e) if e.is_transient() => Err(Outcome::Slot(e)),
        Some(e @ WriteError::Task(_)) => Err(Outcome::Slot(e)),
        Some(e) => Err(Outcome::Patch(PatchError::Fetch(e))),
    }
}

async fn checkpoint_patch(file: &Arc<File>, record: &mut PatchRecord, path: &Path, bits: &[u8]) -> std::io::Result<()> {
    let (f, mut r, p, b) = (file.clone(), record.clone(), path.to_path_buf(), bits.to_vec());
    let saved = tokio::task::spawn_blocking(move || -> std::io::Result<PatchRecord> {
        f.sync_data()?;
        r.save(&p, &b)?;
        Ok(r)
    })
    .await
    .map_err(|e| std::io::Error::other(e.to_string()))??;
    *record = saved;
    Ok(())
}

/// Patch index entries overlapping `range` of the patch.
pub(super) fn entries_over(patch_index: &ChunkIndex, range: std::ops::Range<u64>) -> Vec<bool> {
    patch_index
        .iter_with_offsets()
        .map(|(offset, e)| range.start < range.end && offset < range.end && offset + u64::from(e.len) > range.start)
        .collect()
}

/// Bytes of the entries `wanted` names that `record` does not hold, once per chunk id.
pub(super) fn unheld_bytes(patch_index: &ChunkIndex, record: &PatchRecord, wanted: &[bool]) -> u64 {
    let bits = hex::decode(&record.done).unwrap_or_default();
    let held = |i| bits.len() == patch_index.len().div_ceil(8) && journal::is_done(&bits, i);
    let mut seen = std::collections::HashSet::new();
    patch_index
        .entries()
        .iter()
        .enumerate()
        .filter(|(i, e)| wanted.get(*i).copied().unwrap_or(false) && !held(*i) && seen.insert(e.id))
        .map(|(_, e)| u64::from(e.len))
        .sum()
}

/// Fetches the patch's header and region table (the chunks holding its first bytes, then as
/// many as the table needs), and reads them. The table's declared length is checked against
/// the limits and the patch's size before anything is allocated for it; the table must
/// describe the images the install goes from and to, and end exactly at the patch's end.
///
/// `probe_limit`, when given, is the most the header and table may cost in this run: a table
/// dearer than that is not fetched (`Ok(None)`). The first fetch is one chunk, which the
/// caller bounded by the same limit.
#[allow(clippy::too_many_arguments)]
pub(super) async fn fetch_header(
    plan: &DeltaPlan,
    fetching: &Fetching,
    patch_index: &ChunkIndex,
    patch_file: &Arc<File>,
    record: &mut PatchRecord,
    target: SlotName,
    (old_size, new_size): (u64, u64),
    probe_limit: Option<u64>,
) -> Result<Option<PatchHeader>, Outcome> {
    let limits = DeltaLimits::default();
    let size = patch_index.image_size();
    let bad = |e: codec::DeltaError| Outcome::Patch(PatchError::Apply(e));
    let before = record.fetched;
    let fixed_len = (HEADER_LEN as u64).min(size);
    fetch_patch(plan, fetching, patch_index, patch_file, record, target, &entries_over(patch_index, 0..fixed_len))
        .await?;
    let mut fixed = [0u8; HEADER_LEN];
    read_patch(patch_file, &mut fixed, 0).map_err(|e| bad(read_error(e, "the header")))?;
    let stored_len = PatchHeader::stored_len(&fixed, &limits).map_err(bad)?;
    if stored_len > size {
        return Err(bad(codec::DeltaError::Truncated { what: "the region table" }));
    }
    let table = entries_over(patch_index, 0..stored_len);
    if let Some(limit) = probe_limit {
        let cost = record.fetched.saturating_sub(before) + unheld_bytes(patch_index, record, &table);
        if cost > limit {
            tracing::info!(table = cost, limit, "the patch's region table costs too much to plan with; chunks instead");
            return Ok(None);
        }
    }
    fetch_patch(plan, fetching, patch_index, patch_file, record, target, &table).await?;
    // Bounded: stored_len ≤ HEADER_LEN + limits.max_table_len (checked by stored_len).
    let mut head = vec![
        0u8;
        usize::try_from(stored_len)
            .map_err(|_| bad(codec::DeltaError::Malformed { reason: "table length" }))?
    ];
    read_patch(patch_file, &mut head, 0).map_err(|e| bad(read_error(e, "the region table")))?;
    let header = PatchHeader::read(&mut head.as_slice(), &limits).map_err(bad)?;
    if header.old_size != old_size {
        return Err(bad(codec::DeltaError::BaseMismatch { expected: header.old_size, actual: old_size }));
    }
    if header.new_size != new_size {
        return Err(bad(codec::DeltaError::IndexMismatch {
            which: "new",
            index_size: new_size,
            image_size: header.new_size,
        }));
    }
    if header.payload_end() != size {
        return Err(bad(codec::DeltaError::Malformed { reason: "the payloads do not end where the patch does" }));
    }
    Ok(Some(header))
}

fn read_patch(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    file.read_exact_at(buf, offset)
}

fn read_error(e: std::io::Error, what: &'static str) -> codec::DeltaError {
    match e.kind() {
        std::io::ErrorKind::UnexpectedEof => codec::DeltaError::Truncated { what },
        _ => codec::DeltaError::ReadPatch(e),
    }
}
