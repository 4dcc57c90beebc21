//! Deterministic bundle archives and hostile tarballs.

use std::fs;
use std::os::unix::fs::{PermissionsExt as _, symlink};
use std::path::Path;

use flotilla_core::archive::{ArchiveError, UnpackLimits, pack_dir, unpack};

fn make_tree(root: &Path, order_reversed: bool) {
    let files: Vec<(&str, &[u8], u32)> = vec![
        ("index.android.bundle", b"console.log('v1')" as &[u8], 0o644),
        ("assets/img/logo.png", b"\x89PNG....", 0o644),
        ("bin/run.sh", b"#!/bin/sh\necho hi\n", 0o755),
        (
            "assets/a-very-long-directory-name-that-goes-past-the-hundred-byte-ustar-limit/and-a-long-file-name-too.json",
            b"{}",
            0o600,
        ),
    ];
    let mut files = files;
    if order_reversed {
        files.reverse();
    }
    for (path, data, mode) in files {
        let p = root.join(path);
        fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        fs::write(&p, data).expect("write");
        fs::set_permissions(&p, fs::Permissions::from_mode(mode)).expect("chmod");
    }
    symlink("img/logo.png", root.join("assets/logo-link")).expect("symlink");
}

#[test]
fn same_tree_gives_same_bytes_and_roundtrips() {
    let a = tempfile::tempdir().expect("tmp");
    let b = tempfile::tempdir().expect("tmp");
    make_tree(a.path(), false);
    std::thread::sleep(std::time::Duration::from_millis(1100)); // different mtimes, on purpose
    make_tree(b.path(), true);
    let mut tar_a = Vec::new();
    let mut tar_b = Vec::new();
    let stats = pack_dir(a.path(), &mut tar_a).expect("pack a");
    pack_dir(b.path(), &mut tar_b).expect("pack b");
    assert_eq!(tar_a, tar_b, "archive bytes depend only on names, contents, modes and links");
    assert_eq!((stats.files, stats.symlinks), (4, 1));

    let out = tempfile::tempdir().expect("tmp");
    unpack(&tar_a[..], out.path(), UnpackLimits::default()).expect("unpack");
    let run = out.path().join("bin/run.sh");
    assert_eq!(fs::read(&run).expect("read"), b"#!/bin/sh\necho hi\n");
    assert_eq!(fs::metadata(&run).expect("meta").permissions().mode() & 0o777, 0o755);
    assert_eq!(fs::read_link(out.path().join("assets/logo-link")).expect("link"), Path::new("img/logo.png"));
    let mut again = Vec::new();
    pack_dir(out.path(), &mut again).expect("repack");
    assert_eq!(again, tar_a, "unpack then pack is the identity");
}

#[test]
fn escaping_symlink_is_refused_when_packing() {
    let a = tempfile::tempdir().expect("tmp");
    symlink("../../etc/passwd", a.path().join("evil")).expect("symlink");
    assert!(matches!(pack_dir(a.path(), &mut Vec::new()), Err(ArchiveError::SymlinkEscapes { .. })));
}

/// A tar entry with a raw name, bypassing the tar crate's own path checks.
fn raw_entry(out: &mut Vec<u8>, name: &str, kind: tar::EntryType, data: &[u8], link: Option<&str>) {
    let mut h = tar::Header::new_old();
    h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
    if let Some(link) = link {
        h.as_old_mut().linkname[..link.len()].copy_from_slice(link.as_bytes());
    }
    h.set_entry_type(kind);
    h.set_size(data.len() as u64);
    h.set_mode(0o644);
    h.set_cksum();
    out.extend_from_slice(h.as_bytes());
    out.extend_from_slice(data);
    out.resize(out.len().div_ceil(512) * 512, 0);
}

fn hostile(entries: &[(&str, tar::EntryType, &[u8], Option<&str>)]) -> Result<(), ArchiveError> {
    let mut tar = Vec::new();
    for (name, kind, data, link) in entries {
        raw_entry(&mut tar, name, *kind, data, *link);
    }
    tar.extend_from_slice(&[0u8; 1024]);
    let dest = tempfile::tempdir().expect("tmp");
    let res = unpack(&tar[..], &dest.path().join("slot"), UnpackLimits::default());
    assert!(!dest.path().join("evil").exists(), "nothing may be written outside the destination");
    res.map(|_| ())
}

#[test]
fn hostile_archives_are_refused() {
    use tar::EntryType::*;
    assert!(matches!(hostile(&[("../evil", Regular, b"x", None)]), Err(ArchiveError::UnsafePath(_))));
    assert!(matches!(hostile(&[("/tmp/evil", Regular, b"x", None)]), Err(ArchiveError::UnsafePath(_))));
    assert!(matches!(hostile(&[("a/../../evil", Regular, b"x", None)]), Err(ArchiveError::UnsafePath(_))));
    assert!(matches!(hostile(&[("link", Symlink, b"", Some("../"))]), Err(ArchiveError::SymlinkEscapes { .. })));
    assert!(matches!(hostile(&[("link", Symlink, b"", Some("/etc"))]), Err(ArchiveError::SymlinkEscapes { .. })));
    assert!(matches!(
        hostile(&[("sub", Directory, b"", None), ("link", Symlink, b"", Some("sub")), ("link/f", Regular, b"x", None)]),
        Err(ArchiveError::ThroughSymlink(_))
    ));
    assert!(matches!(hostile(&[("hl", Link, b"", Some("x"))]), Err(ArchiveError::UnsupportedEntry { .. })));
    assert!(matches!(hostile(&[("dev", Char, b"", None)]), Err(ArchiveError::UnsupportedEntry { .. })));
    assert!(matches!(
        hostile(&[("f", Regular, b"one", None), ("f", Regular, b"two", None)]),
        Err(ArchiveError::Duplicate(_))
    ));
}

#[test]
fn limits_are_enforced() {
    let mut tar = Vec::new();
    for i in 0..5 {
        raw_entry(&mut tar, &format!("f{i}"), tar::EntryType::Regular, b"12345", None);
    }
    tar.extend_from_slice(&[0u8; 1024]);
    let dest = tempfile::tempdir().expect("tmp");
    let few = UnpackLimits { max_entries: 3, max_bytes: 1 << 20 };
    assert!(matches!(unpack(&tar[..], dest.path(), few), Err(ArchiveError::LimitExceeded { what: "entries", .. })));
    let dest = tempfile::tempdir().expect("tmp");
    let small = UnpackLimits { max_entries: 100, max_bytes: 12 };
    assert!(matches!(unpack(&tar[..], dest.path(), small), Err(ArchiveError::LimitExceeded { what: "bytes", .. })));
}
