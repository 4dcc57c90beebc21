//! Bad input: each rejected with a clear error and an event, the active slot untouched.

use std::collections::HashSet;
use std::time::Duration;

use flotilla_core::chunking::ChunkParams;

use crate::support::*;

/// Runs `check-once` expecting a refusal whose message contains `needle`.
fn refused(dev: &Device, args: &[&str], needle: &str) {
    let out = dev.run(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{args:?} should fail: {}", String::from_utf8_lossy(&out.stdout));
    assert!(stderr.contains(needle), "{args:?}: expected {needle:?} in: {stderr}");
}

/// The slot the device boots still holds `image` and is the committed one.
fn untouched(dev: &Device, slot: &str, image: &[u8]) {
    let st = dev.status();
    assert_eq!(st["active_slot"], slot, "{st}");
    assert_eq!(dev.selected_slot(), slot);
    assert_eq!(dev.slot_image(slot), image, "the active slot is untouched");
}

fn failed_reports(p: &Publisher, id: i64, at_least: i64) {
    wait_for("a failed report", Duration::from_secs(20), || {
        (p.show(id)["rollout"]["failed"].as_i64() >= Some(at_least)).then_some(())
    });
}

#[test]
fn bad_releases_are_refused_and_the_active_slot_stays() {
    let coord = Coordinator::start();
    let publisher = Publisher::new(&coord);
    let dev = Device::new(&coord, &publisher.path("root.json"), SlotKind::File, &DeviceOptions::default());
    let v1 = image(51, 2 << 20);
    std::fs::write(publisher.path("v1.img"), &v1).unwrap();
    let r1 = publisher.release("1.0.0", &publisher.path("v1.img"), &[]);
    assert_eq!(dev.check_once()["outcome"], "staged");
    assert_eq!(dev.boot_check().1["outcome"], "committed");
    untouched(&dev, "B", &v1);

    // 1. A chunk tampered with on the store: dropped at every attempt, the install fails.
    let v2 = edited(&v1, 4, 7);
    std::fs::write(publisher.path("v2.img"), &v2).unwrap();
    // No patch: this checks a tampered content chunk.
    let r2 = publisher.release("2.0.0", &publisher.path("v2.img"), &["--no-deltas"]);
    let old: HashSet<String> = chunks_of(&v1, ChunkParams::IMAGE).into_iter().map(|c| c.0).collect();
    let (bad_id, bad_len) = chunks_of(&v2, ChunkParams::IMAGE).into_iter().find(|c| !old.contains(&c.0)).unwrap();
    let obj_path = coord.object_path("chunks", &bad_id);
    let original = std::fs::read(&obj_path).unwrap();
    let mut forged = vec![0u8]; // a well-formed raw object with other bytes
    forged.extend(std::iter::repeat_n(0x5a, bad_len as usize));
    std::fs::write(&obj_path, &forged).unwrap();
    refused(&dev, &["check-once"], &format!("chunk {bad_id} failed verification 3 times"));
    let st = dev.status();
    assert_eq!(st["state"], "failed");
    assert!(st["last_error"].as_str().unwrap().contains("hash to"), "{st}");
    untouched(&dev, "B", &v1);
    failed_reports(&publisher, r2["id"].as_i64().unwrap(), 1);
    // Repaired store: the install resumes, fetching no verified chunk again.
    std::fs::write(&obj_path, &original).unwrap();
    assert_eq!(dev.check_once()["outcome"], "staged");
    let fetched = dev.downloads();
    assert_eq!(fetched.iter().collect::<HashSet<_>>().len(), fetched.len(), "no chunk fetched twice");
    assert_eq!(dev.boot_check().1["outcome"], "committed");
    untouched(&dev, "A", &v2);

    // 2. An expired manifest.
    let v3 = edited(&v2, 2, 8);
    std::fs::write(publisher.path("v3.img"), &v3).unwrap();
    let r3 = publisher.release("3.0.0", &publisher.path("v3.img"), &["--expires", "2s"]);
    let created = std::time::SystemTime::now();
    wait_for("the manifest to expire", Duration::from_secs(10), || {
        (created.elapsed().unwrap_or_default() > Duration::from_secs(3)).then_some(())
    });
    refused(&dev, &["check-once"], "manifest expired at");
    untouched(&dev, "A", &v2);
    failed_reports(&publisher, r3["id"].as_i64().unwrap(), 1);

    // 3. A truncated index on the store.
    let v4 = edited(&v2, 3, 9);
    std::fs::write(publisher.path("v4.img"), &v4).unwrap();
    let r4 = publisher.release("4.0.0", &publisher.path("v4.img"), &[]);
    let idx = coord.object_path("indexes", r4["index_id"].as_str().unwrap());
    let bytes = std::fs::read(&idx).unwrap();
    std::fs::write(&idx, &bytes[..bytes.len() - 36]).unwrap();
    refused(&dev, &["check-once"], "chunk index is");
    untouched(&dev, "A", &v2);
    failed_reports(&publisher, r4["id"].as_i64().unwrap(), 1);

    // 4. A replayed older release (from a USB export).
    let export1 = publisher.path("export-v1");
    publisher.export(r1["id"].as_i64().unwrap(), &export1);
    refused(&dev, &["install", export1.to_str().unwrap()], "is not greater than the installed 2");
    untouched(&dev, "A", &v2);

    // 5. A release for other hardware (from a USB export).
    std::fs::write(&idx, &bytes).unwrap();
    let v5 = edited(&v2, 2, 10);
    std::fs::write(publisher.path("v5.img"), &v5).unwrap();
    let r5 = publisher.release("5.0.0", &publisher.path("v5.img"), &["--hardware", "imx8"]);
    let export5 = publisher.path("export-v5");
    publisher.export(r5["id"].as_i64().unwrap(), &export5);
    refused(&dev, &["install", export5.to_str().unwrap()], "this device is \"rpi4\"");
    untouched(&dev, "A", &v2);

    // 5b. A release for another CPU architecture: the agent reported its own at enrollment, so
    // the coordinator does not offer it; from a USB export the agent refuses it.
    let r5b = publisher.release("5.1.0", &publisher.path("v5.img"), &["--arch", "s390x", "--target-platform", "linux"]);
    assert_eq!(dev.check_once()["outcome"], "up_to_date", "a release for s390x is not offered");
    let export5b = publisher.path("export-v5b");
    publisher.export(r5b["id"].as_i64().unwrap(), &export5b);
    refused(&dev, &["install", export5b.to_str().unwrap()], "manifest supports architectures [\"s390x\"]");
    untouched(&dev, "A", &v2);

    // 6. A truncated index in an export.
    let export4 = publisher.path("export-v4");
    publisher.export(r4["id"].as_i64().unwrap(), &export4);
    let index_file = export4.join("index.bin");
    let b = std::fs::read(&index_file).unwrap();
    std::fs::write(&index_file, &b[..b.len() / 2]).unwrap();
    refused(&dev, &["install", export4.to_str().unwrap()], "chunk index is");
    untouched(&dev, "A", &v2);
    assert_eq!(dev.status()["state"], "committed");
}

#[test]
fn manifest_signed_by_an_unknown_key_is_refused() {
    let coord = Coordinator::start();
    let publisher = Publisher::new(&coord);
    // The device trusts another publisher's root (same coordinator rollout key).
    let other = Publisher::new_root_only(&coord);
    let dev = Device::new(&coord, &other.path("root.json"), SlotKind::File, &DeviceOptions::default());
    let v1 = image(61, 1 << 20);
    std::fs::write(publisher.path("v1.img"), &v1).unwrap();
    let r1 = publisher.release("1.0.0", &publisher.path("v1.img"), &[]);
    refused(&dev, &["check-once"], "release refused: manifest signature");
    let st = dev.status();
    assert_eq!(st["state"], "idle");
    assert!(st["installed"].is_null());
    assert_eq!(dev.selected_slot(), "A");
    assert!(dev.slot_image("b").is_empty(), "nothing was written");
    failed_reports(&publisher, r1["id"].as_i64().unwrap(), 1);
}

/// A tmpfs of a given size mounted on a directory; unmounted on drop.
struct SmallFs(std::path::PathBuf);

impl SmallFs {
    fn mount(dir: &std::path::Path, size: &str) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "the full-disk test mounts a {size} tmpfs and needs root (CAP_SYS_ADMIN): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Self(dir.to_path_buf())
    }

    fn resize(&self, size: &str) {
        let out = std::process::Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.0)
            .output()
            .expect("run mount");
        assert!(out.status.success(), "growing the tmpfs: {}", String::from_utf8_lossy(&out.stderr));
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn full_disk_is_refused_and_the_install_resumes_once_there_is_room() {
    let coord = Coordinator::start();
    let publisher = Publisher::new(&coord);
    let dev = Device::new(&coord, &publisher.path("root.json"), SlotKind::File, &DeviceOptions::default());
    // Slot A lives on a 2 MiB file system; the 4 MiB v2 that goes there cannot fit.
    let small = SmallFs::mount(&dev.path("small"), "2m");
    let config = std::fs::read_to_string(dev.path("agent.toml")).unwrap();
    let slot_a = dev.path("slot-a.img");
    let config = config.replace(slot_a.to_str().unwrap(), dev.path("small/slot-a.img").to_str().unwrap());
    std::fs::write(dev.path("agent.toml"), config).unwrap();

    let v1 = image(71, 1 << 20);
    std::fs::write(publisher.path("v1.img"), &v1).unwrap();
    publisher.release("1.0.0", &publisher.path("v1.img"), &[]);
    assert_eq!(dev.check_once()["slot"], "B");
    assert_eq!(dev.boot_check().1["outcome"], "committed");
    untouched(&dev, "B", &v1);

    let mut v2 = v1.clone();
    v2.extend(image(72, 3 << 20));
    std::fs::write(publisher.path("v2.img"), &v2).unwrap();
    let r2 = publisher.release("2.0.0", &publisher.path("v2.img"), &[]);
    refused(&dev, &["check-once"], "slot A: no space left for the 4194304-byte image");
    let st = dev.status();
    assert_eq!(st["state"], "failed", "{st}");
    assert!(st["last_error"].as_str().unwrap().contains("no space left"), "{st}");
    assert_eq!(st["active_slot"], "B");
    assert_eq!(dev.selected_slot(), "B", "the slot being written never became bootable");
    assert_eq!(dev.slot_image("b"), v1, "the active slot is untouched");
    failed_reports(&publisher, r2["id"].as_i64().unwrap(), 1);

    // Still full: the next check fails the same way, cleanly.
    refused(&dev, &["check-once"], "no space left");
    untouched(&dev, "B", &v1);

    // Room again: the next check resumes the install and no chunk is fetched twice.
    small.resize("16m");
    let out = dev.check_once();
    assert_eq!((out["outcome"].as_str(), out["slot"].as_str()), (Some("staged"), Some("A")), "{out}");
    let fetched = dev.downloads();
    assert_eq!(fetched.iter().collect::<HashSet<_>>().len(), fetched.len(), "no chunk fetched twice");
    assert_eq!(dev.boot_check().1["outcome"], "committed");
    assert_eq!(std::fs::read(dev.path("small/slot-a.img")).unwrap(), v2);
    assert_eq!(dev.status()["installed"]["version"], "2.0.0");
}
