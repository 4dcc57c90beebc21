//! Deterministic archives of bundle directories (the `archive` payload kind), and their
//! safe extraction.
//!
//! [`pack_dir`] writes a tar (GNU headers for long names) whose bytes depend only on the
//! tree's names, contents, permission bits and symlink targets: entries sorted by path,
//! mtime 0, uid/gid 0, no user or group names. The same tree gives the same bytes, and so the
//! same chunks, on every machine. [`unpack`] refuses absolute paths, `..`, symlinks that
//! point outside the tree or that later entries would write through, special files, and
//! archives past the given limits.

use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Component, Path, PathBuf};

/// Why packing or unpacking failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ArchiveError {
    /// File-system or archive I/O failed.
    #[error("{path}: {source}")]
    Io {
        /// Where.
        path: PathBuf,
        /// What.
        #[source]
        source: io::Error,
    },
    /// A name that is not UTF-8 (bundles must be portable).
    #[error("{0}: file names in a bundle must be UTF-8")]
    NonUtf8Path(PathBuf),
    /// An absolute path, `..`, or an empty or NUL-bearing name.
    #[error("{0:?}: absolute paths and `..` are not allowed in a bundle")]
    UnsafePath(String),
    /// A device node, FIFO, socket or hard link.
    #[error("{path}: {kind} entries are not allowed in a bundle")]
    UnsupportedEntry {
        /// The entry.
        path: String,
        /// Its kind.
        kind: &'static str,
    },
    /// A symlink whose target leaves the bundle.
    #[error("symlink {path} -> {target} points outside the bundle")]
    SymlinkEscapes {
        /// The link.
        path: String,
        /// Its target.
        target: String,
    },
    /// An entry would be written through a symlink.
    #[error("{0}: an entry may not be written through a symlink")]
    ThroughSymlink(String),
    /// Two entries with the same path.
    #[error("{0}: the archive has this entry twice")]
    Duplicate(String),
    /// Too many entries or bytes.
    #[error("archive exceeds the limit of {limit} {what}")]
    LimitExceeded {
        /// Entries or bytes.
        what: &'static str,
        /// The limit.
        limit: u64,
    },
}

fn io_err(path: impl Into<PathBuf>) -> impl FnOnce(io::Error) -> ArchiveError {
    let path = path.into();
    move |source| ArchiveError::Io { path, source }
}

/// What a pack or unpack handled.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ArchiveStats {
    /// Regular files.
    pub files: u64,
    /// Directories.
    pub dirs: u64,
    /// Symlinks.
    pub symlinks: u64,
    /// File content bytes.
    pub bytes: u64,
}

/// Bounds on what [`unpack`] accepts.
#[derive(Debug, Clone, Copy)]
pub struct UnpackLimits {
    /// Most entries.
    pub max_entries: u64,
    /// Most content bytes in total.
    pub max_bytes: u64,
}

impl Default for UnpackLimits {
    /// One million entries, 16 GiB.
    fn default() -> Self {
        Self { max_entries: 1_000_000, max_bytes: 16 << 30 }
    }
}

/// Writes a deterministic tar of the tree under `root` to `out`.
///
/// # Errors
/// I/O errors, non-UTF-8 names, special files, or symlinks escaping `root`.
pub fn pack_dir(root: &Path, out: impl Write) -> Result<ArchiveStats, ArchiveError> {
    let mut paths = Vec::new();
    collect(root, Path::new(""), &mut paths)?;
    paths.sort();
    let mut stats = ArchiveStats::default();
    let mut builder = tar::Builder::new(out);
    for rel in &paths {
        let full = root.join(rel);
        let meta = fs::symlink_metadata(&full).map_err(io_err(&full))?;
        let mut header = tar::Header::new_gnu();
        header.set_mtime(0);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mode(meta.permissions().mode() & 0o7777);
        let ft = meta.file_type();
        if ft.is_symlink() {
            let target = fs::read_link(&full).map_err(io_err(&full))?;
            let target_str = target.to_str().ok_or_else(|| ArchiveError::NonUtf8Path(full.clone()))?;
            check_link_target(rel, target_str)?;
            header.set_entry_type(tar::EntryType::Symlink);
            header.set_mode(0o777);
            header.set_size(0);
            builder.append_link(&mut header, rel, &target).map_err(io_err(&full))?;
            stats.symlinks += 1;
        } else if ft.is_dir() {
            header.set_entry_type(tar::EntryType::Directory);
            header.set_size(0);
            builder.append_data(&mut header, rel, io::empty()).map_err(io_err(&full))?;
            stats.dirs += 1;
        } else if ft.is_file() {
            header.set_entry_type(tar::EntryType::Regular);
            header.set_size(meta.len());
            let file = fs::File::open(&full).map_err(io_err(&full))?;
            // A file that changes size while being packed would corrupt the archive; the
            // reader is limited to the size in the header and a short read is an error.
            builder.append_data(&mut header, rel, file.take(meta.len())).map_err(io_err(&full))?;
            stats.files += 1;
            stats.bytes += meta.len();
        } else {
            return Err(ArchiveError::UnsupportedEntry { path: rel.display().to_string(), kind: "special file" });
        }
    }
    builder.into_inner().map_err(io_err(root))?;
    Ok(stats)
}

fn collect(root: &Path, rel: &Path, out: &mut Vec<PathBuf>) -> Result<(), ArchiveError> {
    let dir = root.join(rel);
    for entry in fs::read_dir(&dir).map_err(io_err(&dir))? {
        let entry = entry.map_err(io_err(&dir))?;
        let name = entry.file_name();
        if name.to_str().is_none() {
            return Err(ArchiveError::NonUtf8Path(entry.path()));
        }
        let child = rel.join(&name);
        let ft = entry.file_type().map_err(io_err(entry.path()))?;
        out.push(child.clone());
        if ft.is_dir() {
            collect(root, &child, out)?;
        }
    }
    Ok(())
}

/// Checks a relative entry path: only normal components, UTF-8, no NUL.
fn safe_relative(path: &Path) -> Result<PathBuf, ArchiveError> {
    let text = path.to_str().ok_or_else(|| ArchiveError::NonUtf8Path(path.to_path_buf()))?;
    let unsafe_path = || ArchiveError::UnsafePath(text.to_owned());
    if text.contains('\0') {
        return Err(unsafe_path());
    }
    let mut clean = PathBuf::new();
    for c in path.components() {
        match c {
            Component::Normal(part) => clean.push(part),
            Component::CurDir => {}
            Component::ParentDir | Component::RootDir | Component::Prefix(_) => return Err(unsafe_path()),
        }
    }
    if clean.as_os_str().is_empty() {
        return Err(unsafe_path());
    }
    Ok(clean)
}

/// A symlink at `link` (relative to the bundle root) may point only inside the bundle.
fn check_link_target(link: &Path, target: &str) -> Result<(), ArchiveError> {
    let escapes = || ArchiveError::SymlinkEscapes { path: link.display().to_string(), target: target.to_owned() };
    if target.is_empty() || target.contains('\0') || Path::new(target).is_absolute() {
        return Err(escapes());
    }
    // Depth of the directory holding the link, then walk the target lexically.
    let mut depth: i64 = link.components().count() as i64 - 1;
    for c in Path::new(target).components() {
        match c {
            Component::Normal(_) => depth += 1,
            Component::CurDir => {}
            Component::ParentDir => {
                depth -= 1;
                if depth < 0 {
                    return Err(escapes());
                }
            }
            Component::RootDir | Component::Prefix(_) => return Err(escapes()),
        }
    }
    Ok(())
}

/// Extracts a tar into `dest` (created if missing; should be empty), within `limits`.
///
/// # Errors
/// Unsafe paths, escaping symlinks, writes through symlinks, special entries, duplicates,
/// exceeded limits, I/O.
pub fn unpack(reader: impl Read, dest: &Path, limits: UnpackLimits) -> Result<ArchiveStats, ArchiveError> {
    fs::create_dir_all(dest).map_err(io_err(dest))?;
    let mut archive = tar::Archive::new(reader);
    let mut stats = ArchiveStats::default();
    let mut entries_seen = 0u64;
    for entry in archive.entries().map_err(io_err(dest))? {
        let mut entry = entry.map_err(io_err(dest))?;
        entries_seen += 1;
        if entries_seen > limits.max_entries {
            return Err(ArchiveError::LimitExceeded { what: "entries", limit: limits.max_entries });
        }
        let raw_path = entry.path().map_err(io_err(dest))?.into_owned();
        let rel = safe_relative(&raw_path)?;
        let shown = rel.display().to_string();
        let target = dest.join(&rel);
        ensure_no_symlink_parents(dest, &rel)?;
        let mode = entry.header().mode().map_err(io_err(&target))? & 0o7777;
        match entry.header().entry_type() {
            tar::EntryType::Directory => {
                match fs::symlink_metadata(&target) {
                    Ok(m) if m.is_dir() => {}
                    Ok(_) => return Err(ArchiveError::Duplicate(shown)),
                    Err(_) => fs::create_dir(&target).map_err(io_err(&target))?,
                }
                fs::set_permissions(&target, fs::Permissions::from_mode(mode | 0o700)).map_err(io_err(&target))?;
                stats.dirs += 1;
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let size = entry.header().size().map_err(io_err(&target))?;
                stats.bytes += size;
                if stats.bytes > limits.max_bytes {
                    return Err(ArchiveError::LimitExceeded { what: "bytes", limit: limits.max_bytes });
                }
                let mut file =
                    fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&target).map_err(|e| {
                        if e.kind() == io::ErrorKind::AlreadyExists {
                            ArchiveError::Duplicate(shown.clone())
                        } else {
                            ArchiveError::Io { path: target.clone(), source: e }
                        }
                    })?;
                let copied = io::copy(&mut (&mut entry).take(size), &mut file).map_err(io_err(&target))?;
                if copied != size {
                    return Err(ArchiveError::Io {
                        path: target,
                        source: io::Error::new(io::ErrorKind::UnexpectedEof, "archive is truncated"),
                    });
                }
                file.set_permissions(fs::Permissions::from_mode(mode)).map_err(io_err(&target))?;
                stats.files += 1;
            }
            tar::EntryType::Symlink => {
                let link = entry
                    .link_name()
                    .map_err(io_err(&target))?
                    .ok_or_else(|| ArchiveError::UnsafePath(shown.clone()))?;
                let link_str = link.to_str().ok_or_else(|| ArchiveError::NonUtf8Path(link.to_path_buf()))?.to_owned();
                check_link_target(&rel, &link_str)?;
                std::os::unix::fs::symlink(&link_str, &target).map_err(|e| {
                    if e.kind() == io::ErrorKind::AlreadyExists {
                        ArchiveError::Duplicate(shown.clone())
                    } else {
                        ArchiveError::Io { path: target.clone(), source: e }
                    }
                })?;
                stats.symlinks += 1;
            }
            tar::EntryType::Link => return Err(ArchiveError::UnsupportedEntry { path: shown, kind: "hard link" }),
            // GNU long-name records are consumed by the tar crate before we see an entry.
            tar::EntryType::GNULongName
            | tar::EntryType::GNULongLink
            | tar::EntryType::XHeader
            | tar::EntryType::XGlobalHeader => {}
            _ => return Err(ArchiveError::UnsupportedEntry { path: shown, kind: "special" }),
        }
    }
    Ok(stats)
}

/// Refuses to write `rel` if any existing parent under `dest` is a symlink (or not a
/// directory): a link created by an earlier entry must never redirect a later write.
fn ensure_no_symlink_parents(dest: &Path, rel: &Path) -> Result<(), ArchiveError> {
    let mut cur = dest.to_path_buf();
    let parents: Vec<_> = rel.components().collect();
    for c in &parents[..parents.len().saturating_sub(1)] {
        cur.push(c);
        match fs::symlink_metadata(&cur) {
            Ok(m) if m.file_type().is_symlink() => return Err(ArchiveError::ThroughSymlink(rel.display().to_string())),
            Ok(m) if m.is_dir() => {}
            Ok(_) => return Err(ArchiveError::ThroughSymlink(rel.display().to_string())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                // Parents must come first in the archive; create them if an archive omits them.
                fs::create_dir(&cur).map_err(io_err(&cur))?;
            }
            Err(e) => return Err(ArchiveError::Io { path: cur, source: e }),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_targets_are_checked_lexically() {
        assert!(check_link_target(Path::new("a/b/link"), "../c").is_ok());
        assert!(check_link_target(Path::new("a/link"), "../../etc/passwd").is_err());
        assert!(check_link_target(Path::new("link"), "/etc/passwd").is_err());
        assert!(check_link_target(Path::new("link"), "x/../..").is_err());
    }

    #[test]
    fn unsafe_paths_refused() {
        assert!(safe_relative(Path::new("../x")).is_err());
        assert!(safe_relative(Path::new("/abs")).is_err());
        assert!(safe_relative(Path::new("a/../../b")).is_err());
        assert_eq!(safe_relative(Path::new("./a/b")).unwrap(), PathBuf::from("a/b"));
    }
}
