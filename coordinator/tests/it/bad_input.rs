//! Refused publications and malformed input, endpoint by endpoint.

use flotilla_core::ids::ChunkId;
use flotilla_core::keys::SigningKey;
use flotilla_core::object;
use reqwest::StatusCode;
use serde_json::json;

use crate::support::{Engine, Keys, image, manifest_for, start, start_with};

const SECRET: &str = "enroll-secret-0123456789";

async fn refused_publications(engine: Engine) {
    let s = start(engine).await;
    let keys = Keys::new(20);
    let api = s.create_product("pub", &keys, SECRET).await;
    let img = image(21, 150_000);
    let chunked = flotilla_core::chunking::Chunker::new(flotilla_core::chunking::ChunkParams::BUNDLE)
        .chunk_reader(&img[..])
        .expect("chunk");
    let m = manifest_for("pub", "stable", "1.0.0", 5, &chunked);

    // Nothing uploaded yet: the index is missing.
    let (status, body) = s.publish(&api, &m, &keys, json!(null)).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("index_missing")),
        "{body}"
    );

    // Index uploaded but no chunks: refused, and no release exists afterwards.
    let resp = s
        .http
        .put(format!("{}/v1/indexes/{}", s.url, chunked.index.id()))
        .bearer_auth(&api)
        .body(chunked.index.encode())
        .send()
        .await
        .expect("put");
    assert_eq!(resp.status(), StatusCode::CREATED);
    let (status, body) = s.publish(&api, &m, &keys, json!(null)).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("chunks_missing")),
        "{body}"
    );
    let (_, list) = s.get("/v1/releases", Some(&api)).await;
    assert_eq!(list["releases"].as_array().expect("list").len(), 0, "no half-published release");

    s.upload(&api, &img).await;
    // Signed by a key the product's trust root does not list.
    let stranger =
        Keys { root: SigningKey::from_ed25519_seed(&[77; 32]), release: SigningKey::from_ed25519_seed(&[78; 32]) };
    let (status, body) = s.publish(&api, &m, &stranger, json!(null)).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert!(body["error"]["message"].as_str().expect("msg").contains("does not list"), "{body}");

    // Tampered after signing.
    let env = m.sign(&[&keys.release]).expect("sign");
    let forged = String::from_utf8(env.to_json()).expect("utf-8").replace("\"payload\": \"", "\"payload\": \"IA");
    let (status, _) = s.post("/v1/releases", Some(&api), json!({ "product": "pub", "manifest": forged })).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);

    // Manifest for another product under this product's name.
    let mut other = m.clone();
    other.product = "elsewhere".into();
    let env = String::from_utf8(other.sign(&[&keys.release]).expect("sign").to_json()).expect("utf-8");
    let (status, _) = s.post("/v1/releases", Some(&api), json!({ "product": "pub", "manifest": env })).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);

    // Expired manifest.
    let mut expired = m.clone();
    expired.created_at = flotilla_core::time::Timestamp::from_unix(1_000_000);
    expired.expires_at = flotilla_core::time::Timestamp::from_unix(2_000_000);
    assert_eq!(s.publish(&api, &expired, &keys, json!(null)).await.0, StatusCode::UNPROCESSABLE_ENTITY);

    // Accepted, then the same version again → 409, and a version_code that is not greater → 409.
    let (status, body) = s.publish(&api, &m, &keys, json!({ "percent": 5 })).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let (status, body) = s.publish(&api, &m, &keys, json!(null)).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    let mut lower = m.clone();
    lower.version = "1.0.1".parse().expect("semver");
    lower.version_code = 5;
    let (status, body) = s.publish(&api, &lower, &keys, json!(null)).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert!(body["error"]["message"].as_str().expect("msg").contains("use 6 or higher"), "{body}");
    // Both rollout forms at once are refused.
    let mut next = m.clone();
    next.version = "1.1.0".parse().expect("semver");
    next.version_code = 6;
    let (status, _) = s.publish(&api, &next, &keys, json!({ "percent": 5, "stages": [{ "percent": 100 }] })).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

async fn refused_uploads(engine: Engine) {
    let s = start(engine).await;
    let api = s.create_product("up", &Keys::new(30), SECRET).await;
    let data = b"some chunk bytes, repeated. ".repeat(100);
    let id = ChunkId::of(&data);
    let put = |path: String, body: Vec<u8>| {
        let req = s.http.put(format!("{}{path}", s.url)).bearer_auth(&api).body(body);
        async move { req.send().await.expect("put").status() }
    };
    // Bytes that do not hash to the id.
    let wrong = object::encode(b"other bytes", 3);
    assert_eq!(put(format!("/v1/chunks/{id}?len=11"), wrong).await, StatusCode::UNPROCESSABLE_ENTITY);
    // A zip bomb: a small object that inflates past the declared length.
    let bomb = object::encode(&vec![0u8; 1 << 20], 19);
    assert_eq!(put(format!("/v1/chunks/{id}?len={}", data.len()), bomb).await, StatusCode::UNPROCESSABLE_ENTITY);
    // Bad id, missing or absurd length.
    assert_eq!(put("/v1/chunks/xyz?len=5".into(), vec![0, 1]).await, StatusCode::BAD_REQUEST);
    assert_eq!(put(format!("/v1/chunks/{id}"), object::encode(&data, 3)).await, StatusCode::BAD_REQUEST);
    assert_eq!(put(format!("/v1/chunks/{id}?len=999999999"), object::encode(&data, 3)).await, StatusCode::BAD_REQUEST);
    // The right object is accepted, twice (idempotent).
    assert_eq!(put(format!("/v1/chunks/{id}?len={}", data.len()), object::encode(&data, 3)).await, StatusCode::CREATED);
    assert_eq!(put(format!("/v1/chunks/{id}?len={}", data.len()), object::encode(&data, 3)).await, StatusCode::CREATED);
    // An index whose bytes do not hash to its id, and one that does not decode.
    assert_eq!(put(format!("/v1/indexes/{id}"), b"FLOTIDX\0garbage".to_vec()).await, StatusCode::UNPROCESSABLE_ENTITY);
    let junk = b"not an index".to_vec();
    assert_eq!(
        put(format!("/v1/indexes/{}", flotilla_core::ids::IndexId::of(&junk)), junk).await,
        StatusCode::UNPROCESSABLE_ENTITY
    );
    // Oversized upload bodies are cut off.
    let huge = vec![0u8; (64 << 20) + 1];
    assert_eq!(put(format!("/v1/chunks/{id}?len=16"), huge).await, StatusCode::PAYLOAD_TOO_LARGE);
    // Too many ids in one missing query.
    let ids: Vec<String> = (0..100_001).map(|_| id.to_hex()).collect();
    // The body is over the 4 MiB JSON limit: the server answers 413 as soon as it sees the
    // Content-Length and closes the connection, which the client may notice while it is still
    // sending (an incomplete message) instead of reading the 413. A client of its own, so the
    // shared one never reuses the connection the server dropped.
    let one_off = reqwest::Client::builder().build().expect("client");
    match one_off
        .post(format!("{}/v1/chunks/missing", s.url))
        .bearer_auth(&api)
        .json(&json!({ "ids": ids }))
        .send()
        .await
    {
        Ok(resp) => assert!(
            resp.status() == StatusCode::BAD_REQUEST || resp.status() == StatusCode::PAYLOAD_TOO_LARGE,
            "{}",
            resp.status()
        ),
        Err(e) => assert!(e.is_request() && !e.is_timeout(), "{e:?}"),
    }
    let (status, _) = s.post("/v1/chunks/missing", Some(&api), json!({ "ids": ["NOTHEX"] })).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
}

async fn malformed_device_input(engine: Engine) {
    let s = start_with(engine, |c| c.rate_limits.enrolls_per_minute = 30).await;
    s.create_product("dev", &Keys::new(40), SECRET).await;
    let enroll = |body: serde_json::Value| s.post("/v1/devices/enroll", None, body);
    let base = json!({ "device_id": "ok-1", "product": "dev", "channel": "stable", "enrollment_secret": SECRET });
    let with = |k: &str, v: serde_json::Value| {
        let mut b = base.clone();
        b[k] = v;
        b
    };
    assert_eq!(enroll(with("device_id", json!("../etc"))).await.0, StatusCode::BAD_REQUEST);
    assert_eq!(enroll(with("device_id", json!("x".repeat(200)))).await.0, StatusCode::BAD_REQUEST);
    assert_eq!(enroll(with("channel", json!("bad channel"))).await.0, StatusCode::BAD_REQUEST);
    assert_eq!(enroll(with("version", json!("not-semver"))).await.0, StatusCode::BAD_REQUEST);
    assert_eq!(enroll(with("version_code", json!(u64::MAX))).await.0, StatusCode::BAD_REQUEST);
    assert_eq!(enroll(with("enrollment_secret", json!("wrong-secret-000000"))).await.0, StatusCode::UNAUTHORIZED);
    assert_eq!(enroll(with("product", json!("nope"))).await.0, StatusCode::NOT_FOUND);
    assert_eq!(enroll(with("unexpected", json!(1))).await.0, StatusCode::UNPROCESSABLE_ENTITY);
    let raw = s
        .http
        .post(format!("{}/v1/devices/enroll", s.url))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .expect("post");
    assert_eq!(raw.status(), StatusCode::BAD_REQUEST);
    let token = {
        let (status, body) = enroll(base.clone()).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        body["token"].as_str().expect("token").to_owned()
    };
    let (status, _) = s.get(&format!("/v1/updates/check?nonce={}", "a".repeat(200)), Some(&token)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _) = s.get("/v1/updates/check?native_version=x.y", Some(&token)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _) = s.post("/v1/devices/events", Some(&token), json!({ "events": [{ "kind": "exploded" }] })).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _) = s
        .post(
            "/v1/devices/events",
            Some(&token),
            json!({ "events": [{ "kind": "failed", "detail": "x".repeat(5000) }] }),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _) = s
        .post("/v1/devices/events", Some(&token), json!({ "events": [{ "kind": "failed", "release_id": 999999 }] }))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    // Re-enrolling revokes the old token.
    enroll(base.clone()).await;
    assert_eq!(s.get("/v1/updates/check", Some(&token)).await.0, StatusCode::UNAUTHORIZED);
    // Rate limit on enrollment.
    let mut limited = false;
    for i in 0..40 {
        if enroll(with("device_id", json!(format!("flood-{i}")))).await.0 == StatusCode::TOO_MANY_REQUESTS {
            limited = true;
            break;
        }
    }
    assert!(limited, "enrollment is rate limited per client");
}

/// Behind a load balancer every request comes from the balancer's address: with
/// `trust_forwarded_for` the limit counts the client address the balancer appended to
/// `X-Forwarded-For` (the last entry), so one noisy client is limited and the others are not,
/// and a client cannot dodge its limit by writing its own header entries first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_count_forwarded_clients_behind_a_trusted_proxy() {
    let s = start_with(Engine::Sqlite, |c| {
        c.rate_limits.enrolls_per_minute = 5;
        c.trust_forwarded_for = true;
    })
    .await;
    s.create_product("lb", &Keys::new(12), SECRET).await;
    let enroll = |i: usize, forwarded: &'static str| {
        let (url, http) = (format!("{}/v1/devices/enroll", s.url), s.http.clone());
        async move {
            http.post(url)
                .header("x-forwarded-for", forwarded)
                .json(&json!({ "device_id": format!("lb-{i}"), "product": "lb", "channel": "stable", "enrollment_secret": SECRET }))
                .send()
                .await
                .expect("enroll")
                .status()
        }
    };
    let mut noisy = Vec::new();
    for i in 0..8 {
        // Forged first entries change nothing: the proxy's own entry is last.
        let forwarded = if i % 2 == 0 { "203.0.113.7" } else { "198.51.100.99, 203.0.113.7" };
        noisy.push(enroll(i, forwarded).await);
    }
    assert!(noisy.contains(&StatusCode::TOO_MANY_REQUESTS), "the noisy client is limited: {noisy:?}");
    assert_eq!(noisy.iter().filter(|s| **s == StatusCode::CREATED).count(), 5, "{noisy:?}");
    // Another client behind the same balancer still gets through.
    assert_eq!(enroll(100, "203.0.113.8").await, StatusCode::CREATED);
}

crate::both_engines!(refused_publications, refused_uploads, malformed_device_input);
