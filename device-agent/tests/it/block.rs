//! `block` slots on an A/B pair of loop devices (`losetup`; needs root, as CI runs; fails
//! loudly without it): v1 then v2 are written over the devices (never created or truncated),
//! boot-check commits, a broken v3 is rolled back, and an image larger than the device is
//! refused before a byte is written.

use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::support::*;

/// A loop device over a backing file, detached on drop.
struct Loop {
    dev: PathBuf,
}

impl Loop {
    fn new(backing: &Path, size: u64) -> Self {
        std::fs::File::create(backing).and_then(|f| f.set_len(size)).expect("backing file");
        let out = Command::new("losetup")
            .args(["-f", "--show"])
            .arg(backing)
            .output()
            .expect("run losetup (util-linux; scripts/test.sh installs it; this test does not skip without it)");
        assert!(out.status.success(), "losetup failed (root needed): {}", String::from_utf8_lossy(&out.stderr));
        let dev = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        assert!(dev.exists(), "{} is missing", dev.display());
        Self { dev }
    }

    /// The first `n` bytes of the device.
    fn head(&self, n: usize) -> Vec<u8> {
        let mut buf = vec![0u8; n];
        std::fs::File::open(&self.dev).and_then(|mut f| f.read_exact(&mut buf)).expect("read the device");
        buf
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
    }
}

/// A device whose slots are the two loop devices.
fn block_device(coord: &Coordinator, publisher: &Publisher, a: &Loop, b: &Loop, opts: &DeviceOptions) -> Device {
    let dev = Device::new(coord, &publisher.path("root.json"), SlotKind::File, opts);
    let config = dev.path("agent.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    let files = format!(
        "kind = \"file\"\na = \"{}\"\nb = \"{}\"",
        dev.path("slot-a.img").display(),
        dev.path("slot-b.img").display()
    );
    assert!(text.contains(&files), "{text}");
    let blocks = format!("kind = \"block\"\na = \"{}\"\nb = \"{}\"", a.dev.display(), b.dev.display());
    std::fs::write(&config, text.replace(&files, &blocks)).unwrap();
    dev
}

#[test]
fn block_slots_on_loop_devices_install_switch_and_roll_back() {
    let coord = Coordinator::start();
    let publisher = Publisher::new(&coord);
    let work = tempfile::tempdir().unwrap();
    let size = 4u64 << 20;
    let (a, b) = (Loop::new(&work.path().join("a.bin"), size), Loop::new(&work.path().join("b.bin"), size));
    let marker = publisher.path("healthy");
    std::fs::write(&marker, b"").unwrap();
    let opts = DeviceOptions {
        health: format!("checks = [{{ command = \"test -f {}\" }}]", marker.display()),
        boot_attempts: 1,
        ..DeviceOptions::default()
    };
    let dev = block_device(&coord, &publisher, &a, &b, &opts);
    assert_eq!(dev.status()["slots"], "block");

    let v1 = image(71, 3 << 20);
    std::fs::write(publisher.path("v1.img"), &v1).unwrap();
    publisher.release("1.0.0", &publisher.path("v1.img"), &[]);
    assert_eq!(dev.check_once()["slot"], "B");
    assert_eq!(b.head(v1.len()), v1);
    assert_eq!(std::fs::metadata(work.path().join("b.bin")).unwrap().len(), size, "the device is not resized");
    assert_eq!(dev.boot_check().1["outcome"], "committed");

    let v2 = edited(&v1, 6, 5);
    std::fs::write(publisher.path("v2.img"), &v2).unwrap();
    publisher.release("1.1.0", &publisher.path("v2.img"), &["--no-deltas"]);
    let report = dev.check_once();
    assert_eq!(report["slot"], "A", "{report}");
    assert!(report["bytes"]["local"].as_u64().unwrap() > 0, "unchanged chunks come from slot B: {report}");
    assert_eq!(a.head(v2.len()), v2);
    assert_eq!(dev.boot_check().1, serde_json::json!({ "outcome": "committed", "slot": "A", "version": "1.1.0" }));

    // v3 fails its health check: back to slot A, whose bytes are untouched.
    std::fs::remove_file(&marker).unwrap();
    let v3 = edited(&v1, 9, 7);
    std::fs::write(publisher.path("v3.img"), &v3).unwrap();
    publisher.release("1.2.0", &publisher.path("v3.img"), &["--no-deltas"]);
    assert_eq!(dev.check_once()["slot"], "B");
    assert_eq!(b.head(v3.len()), v3);
    let (code, report) = dev.boot_check();
    assert_eq!(code, 3, "{report}");
    assert_eq!(report["slot"], "A");
    let st = dev.status();
    assert_eq!((st["installed"]["version"].as_str(), st["selected_slot"].as_str()), (Some("1.1.0"), Some("A")));
    assert_eq!(a.head(v2.len()), v2);
}

#[test]
fn an_image_larger_than_the_block_device_is_refused() {
    let coord = Coordinator::start();
    let publisher = Publisher::new(&coord);
    let work = tempfile::tempdir().unwrap();
    let (a, b) = (Loop::new(&work.path().join("a.bin"), 1 << 20), Loop::new(&work.path().join("b.bin"), 1 << 20));
    let dev = block_device(&coord, &publisher, &a, &b, &DeviceOptions::default());
    let big = image(72, (1 << 20) + 4096);
    std::fs::write(publisher.path("big.img"), &big).unwrap();
    publisher.release("1.0.0", &publisher.path("big.img"), &[]);
    let out = dev.run(&["check-once"]);
    assert!(!out.status.success(), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("holds 1048576 bytes, the image needs 1052672"), "{err}");
    assert_eq!(b.head(1 << 20), vec![0u8; 1 << 20], "not a byte written");
    assert_eq!(dev.status()["state"], "failed");
}
