//! Patches: `release` builds them from earlier releases and lists them in the signed
//! manifest, the coordinator serves their chunks like any other, `patch` adds one after the
//! fact through a re-publish that changes only `deltas`.

use flotilla_core::delta::{self, DeltaLimits};
use flotilla_core::index::ChunkIndex;
use serde_json::Value;

use crate::support::{Coordinator, Engine, Flotilla, both_engines, http_json, image, write};

/// One blocking GET of raw bytes (tests only).
fn http_bytes(url: &str) -> Vec<u8> {
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime").block_on(async {
        let resp = reqwest::get(url).await.expect("request");
        assert!(resp.status().is_success(), "GET {url}: {}", resp.status());
        resp.bytes().await.expect("body").to_vec()
    })
}

/// The manifest the coordinator stores for release `id`.
fn manifest(coord: &Coordinator, id: i64) -> Value {
    let release = http_json("GET", &format!("{}/v1/releases/{id}", coord.url), &coord.admin, None);
    let env = flotilla_core::dsse::Envelope::from_json(release["manifest"].as_str().expect("manifest").as_bytes())
        .expect("envelope");
    serde_json::from_slice(&env.payload).expect("manifest json")
}

/// Downloads a delta's patch through its index and chunks, as an agent would.
fn fetch_patch(coord: &Coordinator, delta: &Value) -> Vec<u8> {
    let index_id = delta["patch_index"]["id"].as_str().expect("patch index id");
    let index = ChunkIndex::decode(&http_bytes(&format!("{}/v1/indexes/{index_id}", coord.url))).expect("index");
    let mut patch = Vec::new();
    for e in index.entries() {
        let object = http_bytes(&format!("{}/v1/chunks/{}", coord.url, e.id));
        patch.extend(flotilla_core::object::decode(&object, &e.id, e.len).expect("patch chunk"));
    }
    assert_eq!(patch.len() as u64, delta["patch_size"].as_u64().expect("patch_size"));
    patch
}

/// Small scattered edits and an insertion: every 64 KiB chunk changes, a patch stays tiny.
fn edited(base: &[u8], seed: u64) -> Vec<u8> {
    let mut out = base.to_vec();
    for (i, at) in (1000..out.len() - 8).step_by(100_000).enumerate() {
        out[at..at + 8].copy_from_slice(&(seed + i as u64).to_le_bytes());
    }
    out.splice(out.len() / 2..out.len() / 2, image(seed, 1000));
    out
}

fn release_builds_and_patch_adds_deltas(engine: Engine) {
    let coord = Coordinator::start(engine);
    let cli = Flotilla::new(&coord);
    let (key, _) = cli.setup_product("kiosk");
    let v1 = image(1, 3 << 20);
    let v2 = edited(&v1, 100);
    let v3 = edited(&v2, 200);
    let (img1, img2, img3) =
        (write(&cli.path("v1.img"), &v1), write(&cli.path("v2.img"), &v2), write(&cli.path("v3.img"), &v3));

    let r1 = cli.ok(&["release", "--product", "kiosk", "--image", &img1, "--version", "1.0.0", "--key", &key]);
    assert_eq!(r1["deltas"], serde_json::json!([]), "nothing to patch from: {r1}");

    // v2: a patch from v1 (downloaded from the coordinator) beats the changed chunks.
    let r2 = cli.ok(&["release", "--product", "kiosk", "--image", &img2, "--version", "1.1.0", "--key", &key]);
    let report = &r2["deltas"][0];
    assert_eq!(report["kept"], true, "{r2}");
    assert_eq!(report["base"], "downloaded", "{r2}");
    assert!(report["encode_s"].as_f64().is_some(), "{r2}");
    let (size, chunks) =
        (report["patch_size"].as_u64().expect("size"), report["chunk_bytes"].as_u64().expect("chunks"));
    assert!(size * 20 < chunks, "patch {size} bytes against {chunks} bytes of new chunks: {r2}");
    let m2 = manifest(&coord, r2["id"].as_i64().expect("id"));
    let deltas = m2["deltas"].as_array().expect("deltas");
    assert_eq!(deltas.len(), 1, "{m2}");
    assert_eq!(deltas[0]["from_version"], "1.0.0");
    assert_eq!(deltas[0]["from_version_code"], 1);
    assert_eq!(deltas[0]["method"], report["method"]);
    // The coordinator serves the patch like any release content, and it rebuilds v2 from v1.
    let patch = fetch_patch(&coord, &deltas[0]);
    let mut out = Vec::new();
    delta::apply(&mut patch.as_slice(), &v1, &mut out, &DeltaLimits::default()).expect("apply");
    assert!(out == v2, "the served patch does not rebuild v2 from v1");

    // v3 without patches, then `patch` adds one from v2 (given locally) after the fact.
    let r3 = cli.ok(&[
        "release",
        "--product",
        "kiosk",
        "--image",
        &img3,
        "--version",
        "1.2.0",
        "--key",
        &key,
        "--no-deltas",
    ]);
    let id3 = r3["id"].as_i64().expect("id");
    assert_eq!(manifest(&coord, id3)["deltas"], serde_json::json!([]));
    let p = cli.ok(&[
        "patch",
        "--product",
        "kiosk",
        "--from",
        "1.1.0",
        "--to",
        "1.2.0",
        "--key",
        &key,
        "--delta-base",
        &img2,
        "--image",
        &img3,
    ]);
    assert_eq!(p["id"], id3, "the same release gets the patch: {p}");
    assert_eq!(p["patch"]["base"], "local", "{p}");
    let m3 = manifest(&coord, id3);
    assert_eq!(m3["version_code"], 3, "{m3}");
    let deltas = m3["deltas"].as_array().expect("deltas");
    assert_eq!(deltas.len(), 1, "{m3}");
    assert_eq!(deltas[0]["from_version"], "1.1.0");
    let patch = fetch_patch(&coord, &deltas[0]);
    let mut out = Vec::new();
    delta::apply(&mut patch.as_slice(), &v2, &mut out, &DeltaLimits::default()).expect("apply");
    assert!(out == v3, "the added patch does not rebuild v3 from v2");
    // Building the same patch again (downloading the images this time) finds it listed
    // already: one delta from 1.1.0, no re-publish.
    let again = cli.ok(&["patch", "--product", "kiosk", "--from", "1.1.0", "--to", "1.2.0", "--key", &key]);
    assert_eq!(again["deltas"], 1, "{again}");
    assert_eq!(again["unchanged"], true, "the same patch again changes nothing: {again}");
    assert_eq!(again["patch"]["base"], "downloaded", "{again}");

    // A re-publish that changes more than `deltas` is still a conflict.
    let dup = cli.fails(&["release", "--product", "kiosk", "--image", &img2, "--version", "1.2.0", "--key", &key], 4);
    assert!(dup.contains("already published"), "{dup}");
    // `patch` refuses a patch that does not pay, and names the threshold.
    let refused = cli.fails(
        &[
            "patch",
            "--product",
            "kiosk",
            "--from",
            "1.0.0",
            "--to",
            "1.2.0",
            "--key",
            &key,
            "--delta-min-saving",
            "99.99",
        ],
        6,
    );
    assert!(refused.contains("does not beat chunk reuse"), "{refused}");
    // Unknown versions are usage errors.
    let unknown = cli.fails(&["patch", "--product", "kiosk", "--from", "0.9.0", "--to", "1.2.0", "--key", &key], 2);
    assert!(unknown.contains("no release 0.9.0"), "{unknown}");
}
both_engines!(release_builds_and_patch_adds_deltas_on, release_builds_and_patch_adds_deltas);
