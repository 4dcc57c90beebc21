//! Durable file writes: temp file, write, fsync, keep the previous generation, rename, fsync
//! the directory (the order of DESIGN.md's "Journal writes"), and checksummed records.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write as _};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

use crate::crash;

/// Magic line of a checksummed record.
const MAGIC: &str = "FLOTILLA-RECORD-1";

fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(suffix);
    path.with_file_name(name)
}

/// The previous generation of `path`, kept by [`write_atomic`].
pub fn previous_of(path: &Path) -> PathBuf {
    sibling(path, ".prev")
}

/// Fsyncs a directory so a rename or create in it is durable.
///
/// # Errors
/// I/O.
pub fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Replaces `path` with `bytes` atomically and durably (mode 0600), keeping the old content as
/// `<path>.prev`. A crash at any instant leaves either the old or the new file.
///
/// # Errors
/// I/O; on error the step must be abandoned, not assumed done.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let tmp = sibling(path, ".tmp");
    let mut f = OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    drop(f);
    crash::point("journal-temp");
    if path.exists() {
        let prev = previous_of(path);
        let _ = fs::remove_file(&prev);
        fs::hard_link(path, &prev)?;
    }
    fs::rename(&tmp, path)?;
    fsync_dir(dir)?;
    crash::point("journal-renamed");
    Ok(())
}

/// Wraps `body` with a magic line and its BLAKE3, so a torn or corrupted file is detected.
pub fn seal(body: &[u8]) -> Vec<u8> {
    let mut out = format!("{MAGIC}\n{}\n", blake3::hash(body).to_hex()).into_bytes();
    out.extend_from_slice(body);
    out
}

/// The body of a sealed record, if it is intact.
pub fn unseal(bytes: &[u8]) -> Option<&[u8]> {
    let rest = bytes.strip_prefix(MAGIC.as_bytes())?.strip_prefix(b"\n")?;
    let (hash, body) = rest.split_at_checked(64)?;
    let body = body.strip_prefix(b"\n")?;
    (blake3::hash(body).to_hex().as_bytes() == hash).then_some(body)
}

/// What [`read_sealed`] found.
#[derive(Debug)]
pub enum Sealed {
    /// Neither the file nor its previous generation exists.
    Missing,
    /// The current generation (or, when it is damaged, the previous one).
    Found(Vec<u8>),
    /// Both generations exist but neither is intact.
    Corrupt,
}

/// Reads a sealed record, falling back to the previous generation when the current one is
/// damaged.
///
/// # Errors
/// I/O other than "not found".
pub fn read_sealed(path: &Path) -> io::Result<Sealed> {
    let mut seen = false;
    for p in [path.to_path_buf(), previous_of(path)] {
        match fs::read(&p) {
            Ok(bytes) => {
                seen = true;
                if let Some(body) = unseal(&bytes) {
                    return Ok(Sealed::Found(body.to_vec()));
                }
                tracing::warn!(path = %p.display(), "damaged record, trying the previous generation");
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(if seen { Sealed::Corrupt } else { Sealed::Missing })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_roundtrip_and_damage() {
        let s = seal(b"{\"a\":1}");
        assert_eq!(unseal(&s), Some(&b"{\"a\":1}"[..]));
        let mut bad = s.clone();
        *bad.last_mut().unwrap() = b'2';
        assert_eq!(unseal(&bad), None);
        assert_eq!(unseal(&s[..s.len() - 1]), None);
    }

    #[test]
    fn falls_back_to_previous_generation() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("journal");
        write_atomic(&p, &seal(b"one")).unwrap();
        write_atomic(&p, &seal(b"two")).unwrap();
        fs::write(&p, b"torn").unwrap();
        assert!(matches!(read_sealed(&p).unwrap(), Sealed::Found(b) if b == b"one"));
        fs::write(previous_of(&p), b"torn").unwrap();
        assert!(matches!(read_sealed(&p).unwrap(), Sealed::Corrupt));
    }
}
