//! Power cuts: the agent aborts at named points (like `kill -9` or a power cut: no
//! destructors, no flushing) during download, write, switch and boot-check. Every trial must
//! leave a bootable, verified slot and a state that resumes to a committed install, without
//! fetching any verified chunk twice.

use std::collections::HashSet;
use std::path::Path;

use crate::support::*;

/// Trials in the test suite (the soak script runs more with FLOTILLA_POWER_CUT_TRIALS).
const TRIALS: u64 = 60;

const INSTALL_POINTS: &[&str] = &[
    "journal-temp",
    "journal-renamed",
    "env-written",
    "marked-unbootable",
    "chunk-fetched",
    "chunk-written",
    "progress-saved",
    "slot-hashed",
    "staged",
    "activated",
    "recorded",
    "event-queued",
    "events-sent",
];
const BOOT_POINTS: &[&str] =
    &["journal-temp", "journal-renamed", "env-written", "trial", "committed-env", "recorded", "event-queued"];

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let dest = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&entry.path(), &dest);
        } else {
            std::fs::copy(entry.path(), &dest).unwrap();
        }
    }
}

/// A small deterministic generator (tests must be reproducible).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self, n: u64) -> u64 {
        self.0 = self.0.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 33) % n
    }
}

/// The slot the bootloader would boot holds a verified image: v1, or v2 once switched.
fn assert_bootable(dev: &Device, v1: &[u8], v2: &[u8], what: &str) {
    let st = dev.status(); // also proves the journal is readable
    let selected = st["selected_slot"].as_str().unwrap().to_owned();
    let img = dev.slot_image(&selected);
    let sha = sha256_hex(&img);
    assert!(
        sha == sha256_hex(v1) || sha == sha256_hex(v2),
        "{what}: slot {selected} is selected but holds no verified image; {st}"
    );
}

#[test]
fn power_cuts_at_random_points_always_leave_a_bootable_resumable_device() {
    let coord = Coordinator::start();
    let publisher = Publisher::new(&coord);
    let opts = DeviceOptions::default();
    let golden = Device::new(&coord, &publisher.path("root.json"), SlotKind::File, &opts);
    let v1 = image(71, 2 << 20);
    std::fs::write(publisher.path("v1.img"), &v1).unwrap();
    publisher.release("1.0.0", &publisher.path("v1.img"), &[]);
    assert_eq!(golden.check_once()["outcome"], "staged");
    assert_eq!(golden.boot_check().1["outcome"], "committed");
    // v2 shares its first half with v1.
    let mut v2 = v1[..v1.len() / 2].to_vec();
    v2.extend(image(72, v1.len() / 2));
    std::fs::write(publisher.path("v2.img"), &v2).unwrap();
    // Chunks, not a patch: the crash points are on the chunk path (delta.rs cuts patches).
    publisher.release("2.0.0", &publisher.path("v2.img"), &["--no-deltas"]);

    let trials = std::env::var("FLOTILLA_POWER_CUT_TRIALS").ok().and_then(|v| v.parse().ok()).unwrap_or(TRIALS);
    let mut rng = Lcg(0x5eed);
    let mut crashed = 0;
    for trial in 0..trials {
        let dev = Device { dir: tempfile::tempdir().unwrap(), kind: SlotKind::File };
        copy_tree(golden.dir.path(), dev.dir.path());
        dev.write_config(&coord.url, &opts);
        let in_boot = rng.next(3) == 0;
        let points = if in_boot { BOOT_POINTS } else { INSTALL_POINTS };
        let point = points[rng.next(points.len() as u64) as usize];
        let n = 1 + rng.next(if point.starts_with("chunk") { 16 } else { 3 });
        let spec = format!("{point}:{n}");
        let what = format!("trial {trial} ({}, {spec})", if in_boot { "boot-check" } else { "install" });

        if in_boot {
            assert_eq!(dev.check_once()["outcome"], "staged", "{what}");
        }
        let args: &[&str] = if in_boot { &["boot-check"] } else { &["check-once"] };
        let out = dev.cmd(args).env("FLOTILLA_AGENT_CRASH_AT", &spec).output().unwrap();
        let aborted = String::from_utf8_lossy(&out.stderr).contains("crash point");
        if aborted {
            crashed += 1;
        } else {
            assert!(out.status.code().is_some_and(|c| c == 0), "{what}: {}", String::from_utf8_lossy(&out.stderr));
        }
        assert_bootable(&dev, &v1, &v2, &what);

        // Power back: the agent resumes, the device boots the new slot and commits it.
        let mut committed = false;
        for _ in 0..4 {
            let st = dev.status();
            match st["state"].as_str().unwrap() {
                "committed" if st["installed"]["version"] == "2.0.0" => {
                    committed = true;
                    break;
                }
                "staged" | "trial" => {
                    let (code, report) = dev.boot_check();
                    assert!(code == 0 || code == 2, "{what}: {report}");
                }
                _ => {
                    let out = dev.check_once();
                    assert!(["staged", "reboot_pending"].contains(&out["outcome"].as_str().unwrap()), "{what}: {out}");
                }
            }
            assert_bootable(&dev, &v1, &v2, &what);
        }
        assert!(committed, "{what}: never committed: {}", dev.status());
        let st = dev.status();
        let active = st["active_slot"].as_str().unwrap();
        assert_eq!(active, "A", "{what}");
        assert_eq!(dev.selected_slot(), "A", "{what}");
        assert_eq!(dev.slot_image("a"), v2, "{what}");
        assert_eq!(dev.slot_image("b"), v1, "{what}: the previous slot stays intact");
        let fetched = dev.downloads();
        let distinct: HashSet<_> = fetched.iter().collect();
        assert_eq!(distinct.len(), fetched.len(), "{what}: a verified chunk was fetched twice: {fetched:?}");
    }
    eprintln!("power cuts: {crashed} of {trials} trials aborted mid-way, all recovered");

    // And a real `kill -9` from outside, mid-download (downloads slowed by the bandwidth cap).
    let slow = DeviceOptions { extra: "max_download_rate = 400000".into(), ..opts.clone() };
    for trial in 0..10u64 {
        let dev = Device { dir: tempfile::tempdir().unwrap(), kind: SlotKind::File };
        copy_tree(golden.dir.path(), dev.dir.path());
        dev.write_config(&coord.url, &slow);
        let what = format!("kill -9 trial {trial}");
        let mut child = dev.cmd(&["check-once"]).spawn().unwrap();
        let k = 1 + rng.next(4) as usize;
        wait_for("chunks to arrive", std::time::Duration::from_secs(30), || (dev.downloads().len() >= k).then_some(()));
        child.kill().unwrap(); // SIGKILL
        let _ = child.wait();
        assert_bootable(&dev, &v1, &v2, &what);
        dev.write_config(&coord.url, &opts);
        assert_eq!(dev.check_once()["outcome"], "staged", "{what}");
        assert_eq!(dev.boot_check().1["outcome"], "committed", "{what}");
        assert_eq!(dev.slot_image("a"), v2, "{what}");
        let fetched = dev.downloads();
        assert!(fetched.len() >= k);
        assert_eq!(fetched.iter().collect::<HashSet<_>>().len(), fetched.len(), "{what}: a chunk was fetched twice");
    }
    assert!(crashed * 2 > trials, "most trials must really cut the power ({crashed} of {trials})");
}
