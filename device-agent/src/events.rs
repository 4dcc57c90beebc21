//! Install events, queued on disk and sent to the coordinator when it is reachable.
//!
//! Each event is one file in `<state>/events/`, written durably before anything is sent, and
//! named by a unique id (time + random) that goes with it to the coordinator, which records
//! each id once. A file is deleted only after the coordinator acknowledged its batch, so
//! events survive being offline and crashes; a crash between the acknowledgement and the
//! delete re-sends ids the coordinator already has and ignores.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::crash;
use crate::durable::{fsync_dir, write_atomic};
use crate::journal::ByteSources;

/// Most events per request (the coordinator accepts 1000).
pub const BATCH: usize = 200;
/// Longest error detail sent (the coordinator accepts 4096 bytes).
pub const MAX_DETAIL: usize = 4000;

/// Event kinds the coordinator knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// Started writing the inactive slot.
    Downloading,
    /// The slot is written and verified.
    Staged,
    /// The switch is made; a reboot boots the new slot.
    Applied,
    /// The new slot booted and is on trial.
    Booted,
    /// The new slot passed its health checks and is committed.
    Healthy,
    /// An install failed (nothing switched), or a health check failed on trial.
    Failed,
    /// The device went back to its previous slot.
    RolledBack,
}

/// Bytes by source, as the coordinator takes them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireBytes {
    /// From peers.
    pub peer: u64,
    /// From the CDN / coordinator.
    pub cdn: u64,
    /// Reused from the active slot (and read from a local export).
    pub local: u64,
    /// From patches.
    pub delta: u64,
}

impl From<ByteSources> for WireBytes {
    fn from(b: ByteSources) -> Self {
        Self { peer: b.peer, cdn: b.cdn, local: b.local + b.file, delta: b.delta }
    }
}

/// One event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Unique id, for de-duplication at the coordinator.
    pub id: String,
    /// Kind.
    pub kind: EventKind,
    /// Coordinator release id, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release_id: Option<i64>,
    /// version_code.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version_code: Option<u64>,
    /// Bytes by source.
    #[serde(default)]
    pub bytes: WireBytes,
    /// Error detail.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

impl Event {
    /// A new event with its unique id (the detail cut to [`MAX_DETAIL`]), logged on the
    /// `flotilla::events::install` target; not queued yet.
    pub fn new(
        kind: EventKind,
        release: (Option<i64>, Option<u64>),
        bytes: ByteSources,
        detail: Option<String>,
    ) -> Self {
        let detail = detail.map(|mut d| {
            if d.len() > MAX_DETAIL {
                let mut cut = MAX_DETAIL;
                while !d.is_char_boundary(cut) {
                    cut -= 1;
                }
                d.truncate(cut);
            }
            d
        });
        let event =
            Self { id: unique_id(), kind, release_id: release.0, version_code: release.1, bytes: bytes.into(), detail };
        tracing::event!(
            target: "flotilla::events::install",
            tracing::Level::INFO,
            kind = ?event.kind,
            version_code = ?event.version_code,
            cdn = event.bytes.cdn,
            local = event.bytes.local,
            delta = event.bytes.delta,
            detail = event.detail.as_deref().unwrap_or(""),
            "install event"
        );
        event
    }
}

/// The on-disk queue.
#[derive(Debug, Clone)]
pub struct EventQueue {
    dir: PathBuf,
}

fn unique_id() -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    let mut rand = [0u8; 8];
    let _ = getrandom::fill(&mut rand);
    format!("{nanos:020}-{}", hex::encode(rand))
}

impl EventQueue {
    /// The queue in `dir` (created on first push).
    pub fn new(dir: &Path) -> Self {
        Self { dir: dir.to_path_buf() }
    }

    /// Queues an event (for a release id and version_code, when known) durably: [`Event::new`] then [`EventQueue::put`].
    ///
    /// # Errors
    /// I/O.
    pub fn push(
        &self,
        kind: EventKind,
        release: (Option<i64>, Option<u64>),
        bytes: ByteSources,
        detail: Option<String>,
    ) -> std::io::Result<Event> {
        let event = Event::new(kind, release, bytes, detail);
        self.put(&event)?;
        Ok(event)
    }

    /// Queues `event` durably, in a file named by its id: putting the same event again
    /// rewrites that file, and once it is sent the coordinator records its id only once.
    ///
    /// # Errors
    /// I/O.
    pub fn put(&self, event: &Event) -> std::io::Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        let path = self.dir.join(format!("{}.json", event.id));
        write_atomic(&path, &serde_json::to_vec(event).unwrap_or_default())?;
        let _ = std::fs::remove_file(crate::durable::previous_of(&path));
        crash::point("event-queued");
        Ok(())
    }

    /// Queued events, oldest first, with their files.
    pub fn pending(&self) -> Vec<(PathBuf, Event)> {
        let Ok(rd) = std::fs::read_dir(&self.dir) else { return Vec::new() };
        let mut out: Vec<(PathBuf, Event)> = rd
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .filter_map(|p| {
                let bytes = std::fs::read(&p).ok()?;
                match serde_json::from_slice::<Event>(&bytes) {
                    Ok(e) => Some((p, e)),
                    Err(_) => {
                        // A damaged event cannot be sent; keep it aside for inspection.
                        let _ = std::fs::rename(&p, p.with_extension("damaged"));
                        None
                    }
                }
            })
            .collect();
        out.sort_by(|a, b| a.1.id.cmp(&b.1.id));
        out
    }

    /// Removes events the coordinator acknowledged.
    ///
    /// # Errors
    /// I/O.
    pub fn remove(&self, paths: &[PathBuf]) -> std::io::Result<()> {
        for p in paths {
            match std::fs::remove_file(p) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        fsync_dir(&self.dir)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_orders_and_removes() {
        let dir = tempfile::tempdir().unwrap();
        let q = EventQueue::new(&dir.path().join("events"));
        let a = q.push(EventKind::Downloading, (None, None), ByteSources::default(), None).unwrap();
        let b = q.push(EventKind::Failed, (None, None), ByteSources::default(), Some("x".repeat(5000))).unwrap();
        assert_ne!(a.id, b.id);
        let p = q.pending();
        assert_eq!(p.len(), 2);
        assert_eq!(p[0].1, a);
        assert_eq!(p[1].1.detail.as_ref().unwrap().len(), MAX_DETAIL);
        q.remove(&[p[0].0.clone()]).unwrap();
        assert_eq!(q.pending().len(), 1);
    }
}
