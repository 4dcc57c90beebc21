//! Installs from binary patches: the CLI publishes v1 and v2 (it builds a patch from v1);
//! a device holding v1 fetches the patch instead of the changed chunks, applies it into the
//! inactive slot and verifies the result. A slot that no longer holds the patch's base, a
//! corrupted patch chunk and a kill during the patch's download or application all end in a
//! verified v2.

use std::collections::HashSet;
use std::process::Output;
use std::time::Duration;

use flotilla_core::index::ChunkIndex;
use serde_json::Value;

use crate::support::*;

/// The signed manifest of a published release, as the coordinator serves it to operators.
fn manifest_of(coord: &Coordinator, id: i64) -> Value {
    flotilla_agent::client::install_crypto_provider();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let rel: Value = rt.block_on(async {
        reqwest::Client::new()
            .get(format!("{}/v1/releases/{id}", coord.url))
            .bearer_auth(ADMIN)
            .send()
            .await
            .expect("get release")
            .json()
            .await
            .expect("release json")
    });
    let envelope = rel["manifest"].as_str().unwrap_or_else(|| panic!("no manifest in {rel}"));
    let env = flotilla_core::dsse::Envelope::from_json(envelope.as_bytes()).expect("envelope");
    serde_json::from_slice(&env.payload).expect("manifest json")
}

/// The patch the manifest offers from `from_version_code`, and its index from the store.
fn patch_of(coord: &Coordinator, manifest: &Value, from_version_code: u64) -> (Value, ChunkIndex) {
    let deltas = manifest["deltas"].as_array().expect("deltas");
    let d = deltas
        .iter()
        .find(|d| d["from_version_code"] == from_version_code)
        .unwrap_or_else(|| panic!("the CLI built no patch from version_code {from_version_code}: {manifest}"))
        .clone();
    let id = d["patch_index"]["id"].as_str().expect("patch index id");
    let bytes = std::fs::read(coord.object_path("indexes", id)).expect("stored patch index");
    (d, ChunkIndex::decode(&bytes).expect("patch index decodes"))
}

/// Distinct patch chunk ids and their total bytes.
fn patch_chunks(index: &ChunkIndex) -> (HashSet<String>, u64) {
    let mut ids = HashSet::new();
    let mut bytes = 0;
    for e in index.entries() {
        if ids.insert(e.id.to_hex()) {
            bytes += u64::from(e.len);
        }
    }
    (ids, bytes)
}

/// Bytes of `new`'s distinct chunks that `old` lacks: what chunk reuse alone would fetch.
fn chunk_bytes(old: &[u8], new: &[u8], params: flotilla_core::chunking::ChunkParams) -> u64 {
    let have: HashSet<String> = chunks_of(old, params).into_iter().map(|(id, _)| id).collect();
    let mut seen = HashSet::new();
    chunks_of(new, params)
        .into_iter()
        .filter(|(id, _)| !have.contains(id) && seen.insert(id.clone()))
        .map(|(_, l)| l)
        .sum()
}

/// `check-once --json` with the install events logged: (report, stderr).
fn check_logged(dev: &Device, crash_at: Option<&str>) -> (Output, String) {
    let mut cmd = dev.cmd(&["check-once", "--json"]);
    cmd.env("RUST_LOG", "warn,flotilla::events=info");
    if let Some(spec) = crash_at {
        cmd.env("FLOTILLA_AGENT_CRASH_AT", spec);
    }
    let out = cmd.output().expect("spawn agent");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (out, stderr)
}

/// A device with v1 installed and committed, and v1 then v2 published.
struct Setup {
    coord: Coordinator,
    publisher: Publisher,
    dev: Device,
    v1: Vec<u8>,
    v2: Vec<u8>,
    v2_id: i64,
}

/// v2: scattered small edits over all of v1 (chunk reuse fetches most chunks again, a patch
/// is small) plus `fresh` new bytes (so the patch spans several chunks).
fn setup(kind: SlotKind, fresh: usize) -> Setup {
    let coord = Coordinator::start();
    let publisher = Publisher::new(&coord);
    let dev = Device::new(&coord, &publisher.path("root.json"), kind, &DeviceOptions::default());
    let v1 = image(81, 4 << 20);
    let mut v2 = edited(&v1, 48, 7);
    v2.extend(image(82, fresh));
    let (p1, p2) = match kind {
        SlotKind::File => {
            std::fs::write(publisher.path("v1.img"), &v1).unwrap();
            std::fs::write(publisher.path("v2.img"), &v2).unwrap();
            (publisher.path("v1.img"), publisher.path("v2.img"))
        }
        SlotKind::Dir => {
            for (name, data) in [("b1", &v1), ("b2", &v2)] {
                let d = publisher.path(name);
                std::fs::create_dir_all(d.join("assets")).unwrap();
                std::fs::write(d.join("index.bundle"), data).unwrap();
                std::fs::write(d.join("assets/logo.bin"), image(83, 100_000)).unwrap();
            }
            (publisher.path("b1"), publisher.path("b2"))
        }
    };
    publisher.release("1.0.0", &p1, &[]);
    assert_eq!(dev.check_once()["outcome"], "staged");
    assert_eq!(dev.boot_check().1["outcome"], "committed");
    let r2 = publisher.release("1.1.0", &p2, &[]);
    let v2_id = r2["id"].as_i64().expect("release id");
    // The images as the slots hold them (a bundle is its deterministic tar).
    let (v1, v2) = match kind {
        SlotKind::File => (v1, v2),
        SlotKind::Dir => (dev.slot_image("b"), flotilla_core_archive(&p2)),
    };
    Setup { coord, publisher, dev, v1, v2, v2_id }
}

/// The deterministic tar of a bundle directory, as the publisher builds it.
fn flotilla_core_archive(dir: &std::path::Path) -> Vec<u8> {
    let mut out = Vec::new();
    flotilla_core::archive::pack_dir(dir, &mut out).expect("pack bundle");
    out
}

fn commits_v2(s: &Setup) {
    let (code, report) = s.dev.boot_check();
    assert_eq!((code, report["outcome"].as_str()), (0, Some("committed")), "{report}");
    assert_eq!(s.dev.status()["installed"]["version"], "1.1.0");
}

fn installs_from_the_patch(kind: SlotKind) {
    let s = setup(kind, 64 << 10);
    let manifest = manifest_of(&s.coord, s.v2_id);
    let (delta, index) = patch_of(&s.coord, &manifest, 1);
    let (patch_ids, patch_bytes) = patch_chunks(&index);
    let params = serde_json::from_value(manifest["chunking"].clone()).expect("chunk params");
    let chunks = chunk_bytes(&s.v1, &s.v2, params);
    assert!(patch_bytes * 4 < chunks, "the patch ({patch_bytes} B) is much smaller than the chunks ({chunks} B)");

    let (out, stderr) = check_logged(&s.dev, None);
    assert!(out.status.success(), "{stderr}");
    let report = json_of(&out);
    assert_eq!(report["outcome"], "staged", "{report}");
    assert_eq!(report["bytes"]["delta"], patch_bytes, "the patch's bytes are fetched: {report}");
    assert_eq!(report["bytes"]["cdn"], 0, "no content chunk is fetched: {report}");
    assert_eq!(report["bytes"]["peer"], 0, "{report}");
    assert!(delta["patch_size"].as_u64().unwrap() >= patch_bytes);
    let fetched = s.dev.downloads();
    assert_eq!(fetched.iter().cloned().collect::<HashSet<_>>(), patch_ids, "only the patch's chunks are fetched");
    assert_eq!(fetched.len(), patch_ids.len(), "each once");
    assert!(!stderr.contains("not used"), "{stderr}");
    assert!(!s.dev.path("state/patch.bin").exists(), "the patch file is removed once applied");
    assert_eq!(s.dev.status()["target"]["bytes"]["delta"], patch_bytes);
    commits_v2(&s);
    let active = s.dev.status()["active_slot"].as_str().unwrap().to_lowercase();
    assert_eq!(s.dev.slot_image(&active), s.v2);

    // The coordinator's figures carry the delta bytes.
    let rel = wait_for("v2's healthy report", Duration::from_secs(20), || {
        let r = s.publisher.show(s.v2_id);
        (r["rollout"]["healthy"] == 1).then_some(r)
    });
    assert_eq!(rel["bytes"]["delta"], patch_bytes, "{rel}");
    assert_eq!(rel["bytes"]["cdn"], 0, "{rel}");
}

#[test]
fn file_slot_installs_v2_from_the_patch() {
    installs_from_the_patch(SlotKind::File);
}

#[test]
fn dir_slot_installs_v2_from_the_patch() {
    installs_from_the_patch(SlotKind::Dir);
}

#[test]
fn an_active_slot_that_no_longer_matches_the_base_falls_back_to_chunks() {
    let s = setup(SlotKind::File, 64 << 10);
    // Someone wrote into the active slot (B) after its install: one byte, near the end.
    let path = s.dev.path("slot-b.img");
    let mut img = std::fs::read(&path).unwrap();
    let at = img.len() - 100;
    img[at] ^= 0xff;
    std::fs::write(&path, &img).unwrap();

    let (out, stderr) = check_logged(&s.dev, None);
    assert!(out.status.success(), "{stderr}");
    let report = json_of(&out);
    assert_eq!(report["outcome"], "staged", "{report}");
    assert_eq!(report["bytes"]["delta"], 0, "no patch byte fetched: {report}");
    assert!(report["bytes"]["cdn"].as_u64().unwrap() > 0, "{report}");
    assert!(
        stderr.contains("does not hold the patch's base image") && stderr.contains("install event"),
        "the event says why: {stderr}"
    );
    commits_v2(&s);
    assert_eq!(s.dev.slot_image("a"), s.v2);
}

#[test]
fn a_corrupted_patch_chunk_is_caught_and_chunks_are_fetched_instead() {
    let s = setup(SlotKind::File, 64 << 10);
    let manifest = manifest_of(&s.coord, s.v2_id);
    let (_, index) = patch_of(&s.coord, &manifest, 1);
    let bad = index.entries()[0].id.to_hex();
    let obj = s.coord.object_path("chunks", &bad);
    let mut bytes = std::fs::read(&obj).expect("stored patch chunk");
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x55;
    std::fs::write(&obj, &bytes).unwrap();

    let (out, stderr) = check_logged(&s.dev, None);
    assert!(out.status.success(), "{stderr}");
    let report = json_of(&out);
    assert_eq!(report["outcome"], "staged", "{report}");
    assert!(report["bytes"]["cdn"].as_u64().unwrap() > 0, "{report}");
    assert!(stderr.contains("not used") && stderr.contains(&bad), "the event names the bad patch chunk: {stderr}");
    assert!(!s.dev.downloads().contains(&bad), "the bad chunk never counts as fetched");
    commits_v2(&s);
    assert_eq!(s.dev.slot_image("a"), s.v2);
}

#[test]
fn kills_during_the_patch_download_and_application_resume_to_a_verified_slot() {
    // Enough fresh bytes that the patch spans several chunks.
    let s = setup(SlotKind::File, 1 << 20);
    let manifest = manifest_of(&s.coord, s.v2_id);
    let (_, index) = patch_of(&s.coord, &manifest, 1);
    let (patch_ids, patch_bytes) = patch_chunks(&index);
    assert!(patch_ids.len() >= 4, "a patch of several chunks: {}", patch_ids.len());
    let index_id = manifest["index"]["id"].as_str().expect("index id");
    let v2_index = ChunkIndex::decode(&std::fs::read(s.coord.object_path("indexes", index_id)).unwrap()).unwrap();

    // A real kill -9 while the patch downloads (slowed by the bandwidth cap, which patches
    // obey like chunks).
    let slow = DeviceOptions { extra: "max_download_rate = 300000".into(), ..DeviceOptions::default() };
    s.dev.write_config(&s.coord.url, &slow);
    let mut child = s.dev.cmd(&["check-once"]).spawn().expect("spawn agent");
    // (The log still lists v1's chunks until the new install starts it afresh.)
    let patch_lines = || s.dev.downloads().iter().filter(|id| patch_ids.contains(*id)).count();
    wait_for("patch chunks to arrive", Duration::from_secs(60), || (patch_lines() >= 2).then_some(()));
    child.kill().expect("SIGKILL");
    let _ = child.wait();
    assert!(patch_lines() < patch_ids.len(), "killed before the patch was complete");
    s.dev.write_config(&s.coord.url, &DeviceOptions::default());

    // Then aborted at the patch's crash points while it downloads and while it is applied
    // (abort: no destructors, nothing flushed, like kill -9 or a power cut).
    for spec in ["patch-chunk-fetched:1", "patch-chunk-written:5"] {
        let (out, stderr) = check_logged(&s.dev, Some(spec));
        assert!(!out.status.success() && stderr.contains("crash point"), "{spec}: {stderr}");
        let st = s.dev.status();
        assert_eq!(st["state"], "downloading", "{spec}: {st}");
        assert_eq!(s.dev.selected_slot(), "B", "the active slot stays selected");
        assert_eq!(s.dev.slot_image("b"), s.v1, "{spec}: the active slot is untouched");
        // The progress record claims only chunks that are in the target slot, verified.
        let progress = flotilla_agent::journal::Progress::load(
            &s.dev.path("state/progress"),
            v2_index.id(),
            flotilla_agent::slot::SlotName::A,
        )
        .expect("progress record");
        let (bits, slot) = (progress.bits(), s.dev.slot_image("a"));
        let mut claimed = 0;
        for (i, (offset, e)) in v2_index.iter_with_offsets().enumerate() {
            if flotilla_agent::journal::is_done(&bits, i) {
                let at = offset as usize..offset as usize + e.len as usize;
                assert_eq!(flotilla_core::ids::ChunkId::of(&slot[at]), e.id, "{spec}: chunk {i} claimed unwritten");
                claimed += 1;
            }
        }
        assert!(claimed < v2_index.len(), "{spec}: the install is not complete yet");
    }
    let (out, stderr) = check_logged(&s.dev, None);
    assert!(out.status.success(), "{stderr}");
    let report = json_of(&out);
    assert_eq!(report["outcome"], "staged", "{report}");
    assert_eq!(report["bytes"]["delta"], patch_bytes, "{report}");
    assert_eq!(report["bytes"]["cdn"], 0, "{report}");
    // A chunk written by a parallel fetch just before the abort may be found in place without
    // a log line; none is fetched twice.
    let fetched = s.dev.downloads();
    let distinct: HashSet<String> = fetched.iter().cloned().collect();
    assert!(distinct.is_subset(&patch_ids), "only patch chunks are fetched: {fetched:?}");
    assert_eq!(fetched.len(), distinct.len(), "no verified patch chunk fetched twice: {fetched:?}");
    commits_v2(&s);
    assert_eq!(s.dev.slot_image("a"), s.v2);
}

/// Incompressible bytes (no stretch a compressor or a patch could shorten).
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 29) as u8
        })
        .collect()
}

/// The plan event's figures: regions from the patch, regions, patch bytes for the table and
/// for the chosen regions, chunk bytes, and the whole-patch and chunks-alone figures, from
/// "…: a of b regions from the patch, …; patch bytes: t for its table, p for the chosen
/// regions; chunk bytes: c (whole patch: w bytes, chunks alone: x)".
fn plan_in(stderr: &str) -> Option<[u64; 7]> {
    let line = stderr.lines().find(|l| l.contains("regions from the patch"))?;
    let after = |key: &str| -> Option<u64> {
        let at = line.find(key)? + key.len();
        line[at..].split(|c: char| !c.is_ascii_digit()).find(|w| !w.is_empty())?.parse().ok()
    };
    let before = |key: &str| -> Option<u64> { line[..line.find(key)?].rsplit(' ').next()?.parse().ok() };
    Some([
        after("): ")?,
        before(" regions from the patch")?,
        after("patch bytes: ")?,
        before(" for the chosen regions")?,
        after("chunk bytes: ")?,
        after("whole patch: ")?,
        after("chunks alone: ")?,
    ])
}

#[test]
fn a_mix_takes_some_regions_from_the_patch_and_the_rest_as_chunks() {
    // v2 over a 6 MiB v1: a new 1 MiB asset stored at both ends of the image (chunks fetch it
    // once; the patch's regions cannot refer to each other, so it carries it twice); between
    // them v1 with an edit every ~28 KiB over 5 MiB (nearly every chunk changes; the patch is
    // tiny), unchanged at both ends. A 2 MiB window makes the encoder cut it into regions.
    let coord = Coordinator::start();
    let publisher = Publisher::new(&coord);
    let dev = Device::new(&coord, &publisher.path("root.json"), SlotKind::File, &DeviceOptions::default());
    let v1 = image(91, 6 << 20);
    let asset = noise(92, 1 << 20);
    let (head, tail) = (512 << 10, (6 << 20) - (512 << 10));
    let mut v2 = asset.clone();
    v2.extend_from_slice(&v1[..head]);
    v2.extend(edited(&v1[head..tail], 180, 9));
    v2.extend_from_slice(&v1[tail..]);
    v2.extend_from_slice(&asset);
    std::fs::write(publisher.path("v1.img"), &v1).unwrap();
    std::fs::write(publisher.path("v2.img"), &v2).unwrap();
    publisher.release("1.0.0", &publisher.path("v1.img"), &[]);
    assert_eq!(dev.check_once()["outcome"], "staged");
    assert_eq!(dev.boot_check().1["outcome"], "committed");
    let r2 = publisher.release("1.1.0", &publisher.path("v2.img"), &["--delta-window", "2097152"]);
    let v2_id = r2["id"].as_i64().expect("release id");

    // The figures of the two single-source plans, from the indexes.
    let manifest = manifest_of(&coord, v2_id);
    let (_, patch_index) = patch_of(&coord, &manifest, 1);
    let (patch_ids, whole_patch) = patch_chunks(&patch_index);
    let params = serde_json::from_value(manifest["chunking"].clone()).expect("chunk params");
    let chunks_only = chunk_bytes(&v1, &v2, params);
    let mut lens: std::collections::HashMap<String, u64> = chunks_of(&v2, params).into_iter().collect();
    lens.extend(patch_index.entries().iter().map(|e| (e.id.to_hex(), u64::from(e.len))));

    // A kill while the chunks are fetched, after the chosen regions were applied: the resumed
    // run neither plans again nor fetches anything twice. (One fetch at a time, so that every
    // chunk written before the kill has its line in the download log.)
    let one = DeviceOptions { parallel_downloads: 1, ..DeviceOptions::default() };
    dev.write_config(&coord.url, &one);
    let (first, stderr) = check_logged(&dev, Some("chunk-written:2"));
    assert!(!first.status.success() && stderr.contains("crash point"), "{stderr}");
    let [from_patch, regions, table, planned_patch, planned_chunks, planned_whole, planned_chunks_only] =
        plan_in(&stderr).unwrap_or_else(|| panic!("no plan event: {stderr}"));
    assert!(0 < from_patch && from_patch < regions, "a mix: {from_patch} of {regions} regions from the patch");
    assert_eq!((planned_whole, planned_chunks_only), (whole_patch, chunks_only), "{stderr}");
    dev.write_config(&coord.url, &DeviceOptions::default());
    let (out, stderr) = check_logged(&dev, None);
    assert!(out.status.success(), "{stderr}");
    assert!(plan_in(&stderr).is_none(), "planned once: {stderr}");
    assert!(!stderr.contains("not used"), "{stderr}");
    let report = json_of(&out);
    assert_eq!(report["outcome"], "staged", "{report}");

    let fetched = dev.downloads();
    let distinct: HashSet<String> = fetched.iter().cloned().collect();
    assert_eq!(fetched.len(), distinct.len(), "no chunk fetched twice: {fetched:?}");
    let patch_fetched: HashSet<&String> = distinct.iter().filter(|id| patch_ids.contains(*id)).collect();
    let patch_bytes: u64 = patch_fetched.iter().map(|id| lens[*id]).sum();
    let content_bytes: u64 = distinct.iter().filter(|id| !patch_ids.contains(*id)).map(|id| lens[id]).sum();
    assert!(!patch_fetched.is_empty() && patch_fetched.len() < patch_ids.len(), "only some patch chunks");
    assert!(content_bytes > 0, "some content chunks");
    assert_eq!(report["bytes"]["delta"], patch_bytes, "{report}");
    assert_eq!((patch_bytes, content_bytes), (table + planned_patch, planned_chunks), "fetched what was planned");
    let total = patch_bytes + content_bytes;
    eprintln!(
        "mix: {total} bytes ({table} patch table + {planned_patch} patch regions + {content_bytes} chunks; \
         {from_patch} of {regions} regions from the patch); whole patch {whole_patch}, chunks only {chunks_only}"
    );
    assert!(total < whole_patch, "the mix ({total} B) beats the whole patch ({whole_patch} B)");
    assert!(total < chunks_only, "the mix ({total} B) beats chunks alone ({chunks_only} B)");

    let s = Setup { coord, publisher, dev, v1, v2, v2_id };
    commits_v2(&s);
    assert_eq!(s.dev.slot_image("a"), s.v2, "the result verifies");
}
