//! v1 then v2 into `file` and `dir` slots; v2 fetches only the changed chunks; boot-check
//! commits; events reach the coordinator.

use std::collections::HashSet;
use std::time::Duration;

use flotilla_core::chunking::ChunkParams;

use crate::support::*;

/// Bytes of `new`'s chunks that `old` lacks (each distinct chunk once).
fn new_chunk_bytes(old: &[u8], new: &[u8], params: ChunkParams) -> (u64, HashSet<String>) {
    let have: HashSet<String> = chunks_of(old, params).into_iter().map(|(id, _)| id).collect();
    let mut seen = HashSet::new();
    let mut bytes = 0;
    for (id, len) in chunks_of(new, params) {
        if !have.contains(&id) && seen.insert(id) {
            bytes += len;
        }
    }
    (bytes, seen)
}

#[test]
fn file_slots_v1_then_v2_fetch_only_changed_chunks() {
    let coord = Coordinator::start();
    let publisher = Publisher::new(&coord);
    let dev = Device::new(&coord, &publisher.path("root.json"), SlotKind::File, &DeviceOptions::default());

    let v1 = image(11, 3 << 20);
    std::fs::write(publisher.path("v1.img"), &v1).unwrap();
    let r1 = publisher.release("1.0.0", &publisher.path("v1.img"), &[]);

    let out = dev.check_once();
    assert_eq!(out["outcome"], "staged", "{out}");
    assert_eq!(out["slot"], "B");
    assert_eq!(out["bytes"]["cdn"], v1.len() as u64, "a fresh device fetches everything: {out}");
    assert_eq!(dev.status()["state"], "staged");
    assert_eq!(dev.selected_slot(), "B");
    assert_eq!(dev.boot_check(), (0, serde_json::json!({ "outcome": "committed", "slot": "B", "version": "1.0.0" })));
    assert_eq!(dev.slot_image("b"), v1);
    let st = dev.status();
    assert_eq!(st["state"], "committed");
    assert_eq!(st["active_slot"], "B");
    assert_eq!(st["installed"]["version_code"], 1);

    // v2: a few scattered edits.
    let v2 = edited(&v1, 6, 3);
    std::fs::write(publisher.path("v2.img"), &v2).unwrap();
    // Chunk reuse alone (patches have their own tests in delta.rs).
    let r2 = publisher.release("1.1.0", &publisher.path("v2.img"), &["--no-deltas"]);
    let (expected_cdn, new_ids) = new_chunk_bytes(&v1, &v2, ChunkParams::IMAGE);
    assert!(expected_cdn > 0 && expected_cdn < v2.len() as u64 / 2);

    let out = dev.check_once();
    assert_eq!(out["outcome"], "staged", "{out}");
    assert_eq!(out["slot"], "A");
    assert_eq!(out["bytes"]["cdn"], expected_cdn, "only the changed chunks are fetched: {out}");
    assert_eq!(out["bytes"]["local"], v2.len() as u64 - expected_cdn, "{out}");
    let fetched: HashSet<String> = dev.downloads().into_iter().collect();
    assert_eq!(fetched, new_ids);
    assert_eq!(dev.downloads().len(), new_ids.len(), "no chunk fetched twice");

    let (code, report) = dev.boot_check();
    assert_eq!((code, report["outcome"].as_str()), (0, Some("committed")), "{report}");
    assert_eq!(dev.slot_image("a"), v2);
    assert_eq!(dev.status()["installed"]["version"], "1.1.0");
    // A normal boot afterwards: nothing on trial.
    assert_eq!(dev.boot_check().1["outcome"], "normal");
    assert_eq!(dev.check_once()["outcome"], "up_to_date");

    // The coordinator's figures: one healthy report each, v2's bytes by source.
    let id2 = r2["id"].as_i64().unwrap();
    let rel = wait_for("v2's healthy report", Duration::from_secs(20), || {
        let r = publisher.show(id2);
        (r["rollout"]["healthy"] == 1).then_some(r)
    });
    assert_eq!(rel["bytes"]["cdn"], expected_cdn);
    assert_eq!(rel["bytes"]["local"], v2.len() as u64 - expected_cdn);
    assert_eq!(publisher.show(r1["id"].as_i64().unwrap())["rollout"]["healthy"], 1);
    assert_eq!(dev.status()["pending_events"], 0);
}

fn write_bundle(dir: &std::path::Path, files: &[(&str, Vec<u8>)]) {
    let _ = std::fs::remove_dir_all(dir);
    for (name, data) in files {
        let p = dir.join(name);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, data).unwrap();
    }
}

#[test]
fn dir_slots_v1_then_v2_swap_the_bundle_pointer() {
    let coord = Coordinator::start();
    let publisher = Publisher::new(&coord);
    let dev = Device::new(&coord, &publisher.path("root.json"), SlotKind::Dir, &DeviceOptions::default());

    let js = image(5, 900_000);
    let assets = image(6, 400_000);
    let bundle = publisher.path("bundle");
    write_bundle(&bundle, &[("index.bundle", js.clone()), ("assets/logo.bin", assets.clone())]);
    publisher.release("1.0.0", &bundle, &[]);
    assert_eq!(dev.check_once()["outcome"], "staged");
    assert_eq!(dev.boot_check().1["outcome"], "committed");
    let current = dev.path("bundles/current");
    assert_eq!(std::fs::read_link(&current).unwrap(), std::path::Path::new("b"));
    assert_eq!(std::fs::read(current.join("index.bundle")).unwrap(), js);
    assert_eq!(dev.status()["bundle_path"], current.display().to_string());

    let js2 = edited(&js, 2, 9);
    write_bundle(
        &bundle,
        &[("index.bundle", js2.clone()), ("assets/logo.bin", assets.clone()), ("new.txt", b"hi".to_vec())],
    );
    publisher.release("1.1.0", &bundle, &["--no-deltas"]);
    let out = dev.check_once();
    assert_eq!(out["outcome"], "staged", "{out}");
    let cdn = out["bytes"]["cdn"].as_u64().unwrap();
    let local = out["bytes"]["local"].as_u64().unwrap();
    assert!(cdn > 0 && cdn * 5 < local, "most of the bundle is reused: {out}");
    assert_eq!(std::fs::read_link(&current).unwrap(), std::path::Path::new("a"), "pointer swapped at the switch");
    assert_eq!(dev.boot_check().1["outcome"], "committed");
    assert_eq!(std::fs::read(current.join("index.bundle")).unwrap(), js2);
    assert_eq!(std::fs::read(current.join("assets/logo.bin")).unwrap(), assets);
    assert_eq!(std::fs::read(current.join("new.txt")).unwrap(), b"hi");
}

/// A 1 MiB release (image from `seed`) published and exported to a directory, and a device
/// offline: its coordinator URL points nowhere.
struct Offline {
    coord: Coordinator,
    publisher: Publisher,
    v1: Vec<u8>,
    id: i64,
    export: std::path::PathBuf,
    dev: Device,
}

impl Offline {
    fn new(seed: u64) -> Self {
        let coord = Coordinator::start();
        let publisher = Publisher::new(&coord);
        let v1 = image(seed, 1 << 20);
        std::fs::write(publisher.path("v1.img"), &v1).unwrap();
        let id = publisher.release("1.0.0", &publisher.path("v1.img"), &[])["id"].as_i64().unwrap();
        let export = publisher.path("export");
        publisher.export(id, &export);
        let dev = Device::new(&coord, &publisher.path("root.json"), SlotKind::File, &DeviceOptions::default());
        dev.write_config("http://127.0.0.1:9", &DeviceOptions::default());
        Self { coord, publisher, v1, id, export, dev }
    }

    /// The release once the coordinator recorded the device's healthy report.
    fn healthy_report(&self) -> serde_json::Value {
        wait_for("the queued healthy report", Duration::from_secs(20), || {
            let r = self.publisher.show(self.id);
            (r["rollout"]["healthy"] == 1).then_some(r)
        })
    }
}

#[test]
fn export_installs_offline_and_events_wait_for_the_coordinator() {
    let o = Offline::new(21);
    let (coord, v1, export, dev) = (&o.coord, &o.v1, &o.export, &o.dev);
    let out = dev.ok(&["install", export.to_str().unwrap(), "--json"]);
    assert_eq!(out["outcome"], "staged", "{out}");
    assert_eq!(out["bytes"]["file"], v1.len() as u64);
    assert_eq!(dev.boot_check().1["outcome"], "committed");
    let queued = dev.status()["pending_events"].as_u64().unwrap();
    assert!(queued >= 4, "events are queued while offline: {queued}");

    // Back online: the queue drains. A crash right after the coordinator took a batch (before
    // the queue forgot it) re-sends it, and the coordinator records each event once.
    dev.write_config(&coord.url, &DeviceOptions::default());
    let out = dev.cmd(&["check-once"]).env("FLOTILLA_AGENT_CRASH_AT", "events-sent:1").output().unwrap();
    assert!(!out.status.success(), "the crash hook fired");
    assert_eq!(dev.status()["pending_events"], queued);
    assert_eq!(dev.check_once()["outcome"], "up_to_date");
    assert_eq!(dev.status()["pending_events"], 0);
    assert_eq!(o.healthy_report()["bytes"]["local"], v1.len() as u64);
}

/// The kinds of the events queued on `dev`, oldest first.
fn queued_kinds(dev: &Device) -> Vec<String> {
    let Ok(dir) = std::fs::read_dir(dev.path("state/events")) else { return Vec::new() };
    let mut events: Vec<(String, String)> = dir
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .map(|p| {
            let e: serde_json::Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
            (e["id"].as_str().unwrap().to_owned(), e["kind"].as_str().unwrap().to_owned())
        })
        .collect();
    events.sort();
    events.into_iter().map(|(_, kind)| kind).collect()
}

#[test]
fn a_power_cut_after_each_state_change_loses_none_of_its_events() {
    let o = Offline::new(25);
    let (coord, v1, export, dev) = (&o.coord, &o.v1, &o.export, &o.dev);

    // Every run is cut right after the journal records its first state change, before that
    // change's event is queued. The next run queues it from the journal's outbox first.
    let install = ["install", export.to_str().unwrap()];
    let runs: [(&[&str], &str); 5] = [
        (&install, "downloading"),
        (&install, "staged"),
        (&install, "applied"),
        (&["boot-check"], "booted"),
        (&["boot-check"], "healthy"),
    ];
    for (i, (args, state)) in runs.iter().enumerate() {
        let out = dev.cmd(args).env("FLOTILLA_AGENT_CRASH_AT", "recorded:1").output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && stderr.contains("crash point recorded"), "run {i} ({state}): {stderr}");
        assert_eq!(queued_kinds(dev).len(), i, "run {i} ({state}): its event is not queued yet");
    }
    assert_eq!(dev.boot_check().1["outcome"], "normal");
    assert_eq!(dev.status()["installed"]["version"], "1.0.0");
    assert_eq!(queued_kinds(dev), ["downloading", "staged", "applied", "booted", "healthy"]);

    // Delivered once the coordinator is back, each recorded once.
    dev.write_config(&coord.url, &DeviceOptions::default());
    assert_eq!(dev.check_once()["outcome"], "up_to_date");
    assert_eq!(dev.status()["pending_events"], 0);
    let rel = o.healthy_report();
    assert_eq!(rel["bytes"]["local"], v1.len() as u64, "the healthy report, once: {rel}");
}

#[test]
fn export_tar_installs_and_a_bad_tar_is_refused() {
    let coord = Coordinator::start();
    let publisher = Publisher::new(&coord);
    let v1 = image(23, 1 << 20);
    std::fs::write(publisher.path("v1.img"), &v1).unwrap();
    let r1 = publisher.release("1.0.0", &publisher.path("v1.img"), &[]);
    let tar = publisher.path("release-1.tar");
    publisher.export(r1["id"].as_i64().unwrap(), &tar);
    assert!(tar.is_file(), "the CLI wrote one tar file");

    let dev = Device::new(&coord, &publisher.path("root.json"), SlotKind::File, &DeviceOptions::default());
    dev.write_config("http://127.0.0.1:9", &DeviceOptions::default());

    // Not an export: garbage, and a missing file. Refused, nothing written, a failed event.
    let junk = publisher.path("junk.tar");
    std::fs::write(&junk, vec![0x41u8; 3000]).unwrap();
    let out = dev.run(&["install", junk.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("not a Flotilla export tar"), "{stderr}");
    let out = dev.run(&["install", publisher.path("missing.tar").to_str().unwrap()]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("missing.tar"));
    let st = dev.status();
    assert!(st["installed"].is_null() && st["target"].is_null(), "{st}");
    assert_eq!(st["pending_events"], 2, "each refusal queues a failed event: {st}");
    assert!(!dev.path("state/import").exists(), "the unpacked copy is removed");

    let out = dev.ok(&["install", tar.to_str().unwrap(), "--json"]);
    assert_eq!(out["outcome"], "staged", "{out}");
    assert_eq!(out["slot"], "B");
    assert_eq!(out["bytes"]["file"], v1.len() as u64);
    assert!(!dev.path("state/import").exists(), "the unpacked copy is removed");
    assert_eq!(dev.boot_check(), (0, serde_json::json!({ "outcome": "committed", "slot": "B", "version": "1.0.0" })));
    assert_eq!(dev.slot_image("b"), v1);
    assert_eq!(dev.status()["installed"]["version"], "1.0.0");
    // The same tar again: the release is installed already (version_code must increase).
    let out = dev.run(&["install", tar.to_str().unwrap()]);
    assert!(!out.status.success(), "reinstalling the installed release is refused");
}
