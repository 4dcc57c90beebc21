//! Publish, check, verify as a device would, download, report.

use flotilla_coordinator::storage::{ObjectKind, object_key};
use flotilla_core::manifest::{DeviceContext, verify_for_device};
use flotilla_core::object;
use flotilla_core::rollout::verify_assignment;
use flotilla_core::time::Timestamp;
use flotilla_core::trust::TrustRoot;
use reqwest::StatusCode;
use serde_json::json;

use crate::support::{Engine, Keys, image, release, start, start_with};

const SECRET: &str = "enroll-secret-0123456789";

async fn publish_check_install(engine: Engine) {
    let s = start(engine).await;
    let keys = Keys::new(1);
    let api = s.create_product("board", &keys, SECRET).await;
    let device = s.enroll("board", "dev-1", "stable", SECRET, Some("rpi4")).await;

    // Nothing published yet.
    let resp =
        s.http.get(format!("{}/v1/updates/check?nonce=ab12", s.url)).bearer_auth(&device).send().await.expect("check");
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);

    let img = image(7, 600_000);
    let id = release(&s, &api, &keys, "board", "1.0.0", 10, &img, json!({ "percent": 100 })).await;

    let resp = s
        .http
        .get(format!("{}/v1/updates/check?nonce=ab12cd&version_code=3", s.url))
        .bearer_auth(&device)
        .send()
        .await
        .expect("check");
    assert_eq!(resp.status(), StatusCode::OK);
    let etag = resp.headers().get("etag").expect("etag").to_str().expect("ascii").to_owned();
    let offer: serde_json::Value = resp.json().await.expect("json");
    assert_eq!(offer["release_id"], id);

    // The device's checks: publisher signature, coordinator signature, agreement.
    let root = TrustRoot::from_trusted_json(s.trust_root(&keys).as_bytes()).expect("root");
    let mut ctx = DeviceContext::new("board", "stable", Timestamp::now());
    ctx.installed_version_code = Some(3);
    ctx.hardware = Some("rpi4".into());
    let manifest = verify_for_device(offer["manifest"].as_str().expect("manifest").as_bytes(), &root, &ctx)
        .expect("manifest verifies");
    let assignment = verify_assignment(
        offer["assignment"].as_str().expect("assignment").as_bytes(),
        &root,
        "dev-1",
        "ab12cd",
        Timestamp::now(),
    )
    .expect("assignment verifies");
    assignment.check_agreement(&manifest).expect("coordinator and publisher agree");
    // Another device's nonce is refused.
    assert!(
        verify_assignment(
            offer["assignment"].as_str().expect("a").as_bytes(),
            &root,
            "dev-1",
            "other",
            Timestamp::now()
        )
        .is_err()
    );

    // Download the index and every chunk from the embedded origin and rebuild the image.
    let index_bytes = s
        .http
        .get(format!("{}{}", s.url, offer["index"]["url"].as_str().expect("url")))
        .send()
        .await
        .expect("index")
        .bytes()
        .await
        .expect("bytes");
    let index = manifest.check_index(&index_bytes).expect("index matches the manifest");
    let mut rebuilt = Vec::new();
    for e in index.entries() {
        let resp = s.http.get(format!("{}/v1/chunks/{}", s.url, e.id)).send().await.expect("chunk");
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.headers()["cache-control"], "public, max-age=31536000, immutable");
        rebuilt.extend(object::decode(&resp.bytes().await.expect("bytes"), &e.id, e.len).expect("chunk verifies"));
    }
    assert_eq!(rebuilt, img);

    // Range request on a chunk object.
    let first = index.entries()[0].id;
    let resp =
        s.http.get(format!("{}/v1/chunks/{first}", s.url)).header("range", "bytes=0-9").send().await.expect("range");
    assert_eq!(resp.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(resp.bytes().await.expect("bytes").len(), 10);

    // ETag without a nonce: nothing changed → 304.
    let resp = s
        .http
        .get(format!("{}/v1/updates/check?version_code=3", s.url))
        .bearer_auth(&device)
        .header("if-none-match", &etag)
        .send()
        .await
        .expect("check");
    assert_eq!(resp.status(), StatusCode::NOT_MODIFIED);

    // Report and see it in the figures.
    let (status, _) = s
        .post(
            "/v1/devices/events",
            Some(&device),
            json!({ "events": [
                { "kind": "downloading", "release_id": id },
                { "kind": "healthy", "release_id": id, "bytes": { "cdn": 500000, "local": 100000 } },
            ]}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let (status, rel) = s.get(&format!("/v1/releases/{id}"), Some(&api)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(rel["rollout"]["healthy"], 1);
    assert_eq!(rel["bytes"]["cdn"], 500000);
    let (_, stats) = s.get(&format!("/v1/releases/{id}/stats"), Some(&api)).await;
    assert_eq!(stats["events"]["healthy"]["devices"], 1);

    // Installed now: nothing newer.
    let resp = s
        .http
        .get(format!("{}/v1/updates/check?version_code=10", s.url))
        .bearer_auth(&device)
        .send()
        .await
        .expect("check");
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);

    // Device list shows the device with its version after the healthy report.
    let (_, devices) = s.get("/v1/devices?product=board", Some(&s.admin)).await;
    assert_eq!(devices["devices"][0]["version_code"], 10);
}

async fn second_release_uploads_only_new_chunks(engine: Engine) {
    let s = start(engine).await;
    let keys = Keys::new(2);
    let api = s.create_product("app", &keys, SECRET).await;
    let v1 = image(3, 400_000);
    let (_, sent_first) = s.upload(&api, &v1).await;
    let mut v2 = v1.clone();
    v2[200_000..200_010].copy_from_slice(b"0123456789");
    let (chunked, sent_second) = s.upload(&api, &v2).await;
    assert!(
        sent_second > 0 && sent_second <= 3,
        "an edit re-sends only nearby chunks, sent {sent_second} of {}",
        chunked.index.len()
    );
    assert!(sent_first > 10);
}

async fn wrong_hardware_and_old_native_shell(engine: Engine) {
    let s = start(engine).await;
    let keys = Keys::new(3);
    let api = s.create_product("kiosk", &keys, SECRET).await;
    let img = image(5, 100_000);
    let (chunked, _) = s.upload(&api, &img).await;
    let mut m = crate::support::manifest_for("kiosk", "stable", "2.0.0", 2, &chunked);
    m.compatibility.hardware = vec!["imx8".into()];
    m.compatibility.min_native_version = Some("5.0.0".parse().expect("semver"));
    let (status, body) = s.publish(&api, &m, &keys, json!({ "percent": 100 })).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");

    let other_hw = s.enroll("kiosk", "k-1", "stable", SECRET, Some("rpi4")).await;
    let resp = s.http.get(format!("{}/v1/updates/check", s.url)).bearer_auth(&other_hw).send().await.expect("check");
    assert_eq!(resp.status(), StatusCode::NO_CONTENT, "other hardware is not offered the release");

    let old_app = s.enroll("kiosk", "k-2", "stable", SECRET, Some("imx8")).await;
    let (status, body) = s.get("/v1/updates/check?native_version=4.2.0", Some(&old_app)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["status"], "native_too_old");
    assert_eq!(body["required_native_version"], "5.0.0");
    let (status, body) = s.get("/v1/updates/check?native_version=5.1.0", Some(&old_app)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["version_code"], 2);
}

/// Releases that name platforms or architectures are offered only to devices that reported a
/// listed one at enrollment; a device that reported nothing gets only untargeted releases. The
/// newest release a device may take is the one it gets, so an older untargeted release still
/// reaches the devices a newer targeted one excludes.
async fn platform_and_architecture_targeting(engine: Engine) {
    let s = start(engine).await;
    let keys = Keys::new(5);
    let api = s.create_product("kiosk", &keys, SECRET).await;
    let (chunked, _) = s.upload(&api, &image(6, 100_000)).await;
    let m = crate::support::manifest_for("kiosk", "stable", "1.0.0", 1, &chunked);
    let (status, body) = s.publish(&api, &m, &keys, json!({ "percent": 100 })).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let mut m = crate::support::manifest_for("kiosk", "stable", "2.0.0", 2, &chunked);
    m.compatibility.platforms = vec!["android".into()];
    m.compatibility.architectures = vec!["aarch64".into(), "arm".into()];
    let (status, body) = s.publish(&api, &m, &keys, json!({ "percent": 100 })).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");

    let enroll = |device: &'static str, platform: Option<&'static str>, arch: Option<&'static str>| {
        let s = &s;
        async move {
            let (status, body) = s
                .post(
                    "/v1/devices/enroll",
                    None,
                    json!({ "device_id": device, "product": "kiosk", "channel": "stable", "enrollment_secret": SECRET,
                            "platform": platform, "architecture": arch }),
                )
                .await;
            assert_eq!(status, StatusCode::CREATED, "{body}");
            body["token"].as_str().expect("token").to_owned()
        }
    };
    for (device, platform, arch, expected) in [
        ("phone", Some("android"), Some("aarch64"), 2),
        ("old-phone", Some("android"), Some("arm"), 2),
        ("emulator", Some("android"), Some("x86_64"), 1),
        ("iphone", Some("ios"), Some("aarch64"), 1),
        ("silent", None, None, 1),
    ] {
        let token = enroll(device, platform, arch).await;
        let (status, body) = s.get("/v1/updates/check", Some(&token)).await;
        assert_eq!(status, StatusCode::OK, "{device}: {body}");
        assert_eq!(body["version_code"], expected, "{device} ({platform:?}, {arch:?})");
    }
    let (_, body) = s.get("/v1/devices?product=kiosk", Some(&s.admin)).await;
    let phone = body["devices"].as_array().expect("devices").iter().find(|d| d["device_id"] == "phone").cloned();
    let phone = phone.expect("phone listed");
    assert_eq!((phone["platform"].as_str(), phone["architecture"].as_str()), (Some("android"), Some("aarch64")));

    let (status, body) = s
        .post(
            "/v1/devices/enroll",
            None,
            json!({ "device_id": "bad", "product": "kiosk", "channel": "stable", "enrollment_secret": SECRET,
                    "architecture": "x86 64" }),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(body.to_string().contains("architecture"), "{body}");
}

/// Checks record last-seen times and versions in memory; a flush writes them all at once
/// (batched statements), and devices that did not check keep their values.
async fn last_seen_is_flushed_in_batches(engine: Engine) {
    let s = start(engine).await;
    s.create_product("seen", &Keys::new(4), SECRET).await;
    let mut tokens = Vec::new();
    // More devices than one UPDATE statement carries.
    for i in 0..620 {
        tokens.push(s.enroll("seen", &format!("d-{i:04}"), "stable", SECRET, None).await);
    }
    sqlx::query("UPDATE devices SET last_seen = 1").execute(&s.state.db.pool).await.expect("reset last_seen");
    for (i, t) in tokens.iter().enumerate().skip(1) {
        let query = if i.is_multiple_of(2) { format!("?version_code={i}") } else { String::new() };
        let resp = s.http.get(format!("{}/v1/updates/check{query}", s.url)).bearer_auth(t).send().await.expect("check");
        assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    }
    let written = flotilla_coordinator::api::flush_last_seen(&s.state).await.expect("flush");
    assert_eq!(written, 619);
    assert_eq!(flotilla_coordinator::api::flush_last_seen(&s.state).await.expect("flush"), 0, "nothing pending");
    let (_, body) = s.get("/v1/devices?product=seen&limit=10000", Some(&s.admin)).await;
    let devices = body["devices"].as_array().expect("devices");
    assert_eq!(devices.len(), 620);
    for d in devices {
        let i: usize = d["device_id"].as_str().expect("id")[2..].parse().expect("number");
        let seen = d["last_seen"].as_i64().expect("last_seen");
        if i == 0 {
            assert_eq!(seen, 1, "a device that did not check is untouched");
        } else {
            assert!(seen > 1, "device {i} was seen");
        }
        let expected = if i.is_multiple_of(2) && i > 0 { json!(i) } else { serde_json::Value::Null };
        assert_eq!(d["version_code"], expected, "device {i}: a reported version is kept, none leaves it as is");
    }
}

/// With a CDN base URL, chunk and index downloads answer 302 to the object's key under that
/// base (the layout the store writes, so a CDN in front of the bucket serves it); an id the
/// coordinator never stored is a 404 from the coordinator, with no redirect.
async fn cdn_base_redirects_stored_objects_only(engine: Engine) {
    let s = start_with(engine, |c| c.cdn_base_url = Some("https://cdn.example.test/fleet/".into())).await;
    let keys = Keys::new(9);
    let api = s.create_product("cdn", &keys, SECRET).await;
    let device = s.enroll("cdn", "dev-c", "stable", SECRET, None).await;
    let img = image(9, 300_000);
    release(&s, &api, &keys, "cdn", "1.0.0", 1, &img, json!({ "percent": 100 })).await;
    let resp =
        s.http.get(format!("{}/v1/updates/check?nonce=c1", s.url)).bearer_auth(&device).send().await.expect("check");
    assert_eq!(resp.status(), StatusCode::OK);
    let offer: serde_json::Value = resp.json().await.expect("json");
    let index_url = offer["index"]["url"].as_str().expect("index url");
    let index_id = index_url.rsplit('/').next().expect("id");

    flotilla_coordinator::tls::install_crypto_provider();
    let http = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().expect("client");
    let location = |resp: &reqwest::Response| resp.headers()["location"].to_str().expect("ascii").to_owned();
    let resp = http.get(format!("{}{index_url}", s.url)).send().await.expect("index");
    assert_eq!(resp.status(), StatusCode::FOUND);
    let expected = object_key(ObjectKind::Index, index_id);
    assert_eq!(location(&resp), format!("https://cdn.example.test/fleet/{expected}"));

    // A stored chunk (the first of the image) redirects to its key.
    let index = flotilla_core::chunking::Chunker::new(flotilla_core::chunking::ChunkParams::BUNDLE)
        .chunk_reader(&img[..])
        .expect("chunk")
        .index;
    let first = index.entries()[0].id.to_hex();
    let resp = http.get(format!("{}/v1/chunks/{first}", s.url)).send().await.expect("chunk");
    assert_eq!(resp.status(), StatusCode::FOUND);
    assert_eq!(location(&resp), format!("https://cdn.example.test/fleet/{}", object_key(ObjectKind::Chunk, &first)));

    // Unknown ids, and an index id asked for as a chunk: 404 from the coordinator.
    for path in [
        format!("/v1/chunks/{}", "ef".repeat(32)),
        format!("/v1/indexes/{}", "ef".repeat(32)),
        format!("/v1/chunks/{index_id}"),
    ] {
        let resp = http.get(format!("{}{path}", s.url)).send().await.expect("missing");
        assert_eq!(resp.status(), StatusCode::NOT_FOUND, "{path}");
        assert!(resp.headers().get("location").is_none(), "{path}");
    }
}

/// Many devices reporting at once: every batch is recorded, none fails with "database is
/// locked" (on SQLite each batch reads the release, then writes, in one transaction).
async fn concurrent_event_batches_are_all_recorded(engine: Engine) {
    let s = start(engine).await;
    let keys = Keys::new(11);
    let api = s.create_product("busy", &keys, SECRET).await;
    let id = release(&s, &api, &keys, "busy", "1.0.0", 1, &image(11, 100_000), json!({ "percent": 100 })).await;
    let mut devices = Vec::new();
    for i in 0..12 {
        devices.push(s.enroll("busy", &format!("dev-{i}"), "stable", SECRET, None).await);
    }
    let server = &s;
    let posts = devices.iter().enumerate().flat_map(|(d, token)| {
        (0..8).map(move |n| {
            let body = json!({ "events": [{ "id": format!("e-{d}-{n}"), "kind": "downloading", "release_id": id,
                                             "bytes": { "cdn": 1000 } }] });
            async move { server.post("/v1/devices/events", Some(token), body).await }
        })
    });
    for (status, body) in futures::future::join_all(posts).await {
        assert!(status.is_success(), "{status}: {body}");
    }
    let (status, stats) = s.get(&format!("/v1/releases/{id}"), Some(&api)).await;
    assert_eq!(status, StatusCode::OK, "{stats}");
    assert_eq!(stats["bytes"]["cdn"], 12 * 8 * 1000, "every event counted once: {stats}");
}

crate::both_engines!(
    concurrent_event_batches_are_all_recorded,
    cdn_base_redirects_stored_objects_only,
    last_seen_is_flushed_in_batches,
    publish_check_install,
    second_release_uploads_only_new_chunks,
    wrong_hardware_and_old_native_shell,
    platform_and_architecture_targeting
);
