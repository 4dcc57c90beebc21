//! Test harness: start a coordinator, build trust roots and releases, enroll devices.

use std::time::Duration;

use flotilla_coordinator::config::Config;
use flotilla_coordinator::state::AppState;
use flotilla_core::chunking::{ChunkParams, Chunker};
use flotilla_core::keys::SigningKey;
use flotilla_core::manifest::{Compatibility, IndexRef, Manifest, Payload, PayloadKind};
use flotilla_core::object;
use flotilla_core::time::Timestamp;
use flotilla_core::trust::RootDocument;
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Engine {
    Sqlite,
    Postgres,
}

/// A fresh PostgreSQL database on the test server; panics (fails the test) when none is
/// configured, because a test that cannot reach its service must not pass.
pub(crate) async fn pg_database() -> String {
    let base = std::env::var("FLOTILLA_TEST_PG_URL")
        .expect("FLOTILLA_TEST_PG_URL is not set: run the tests with `bash scripts/test.sh`, which starts PostgreSQL");
    sqlx::any::install_default_drivers();
    let mut suffix = [0u8; 6];
    getrandom::fill(&mut suffix).expect("random");
    let name = format!("flotilla_t_{}", hex::encode(suffix));
    let mut conn =
        <sqlx::AnyConnection as sqlx::Connection>::connect(&base).await.expect("connect to the test PostgreSQL");
    sqlx::Executor::execute(&mut conn, sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .await
        .expect("create database");
    let (prefix, _) = base.rsplit_once('/').expect("database URL with a path");
    format!("{prefix}/{name}")
}

pub(crate) struct Server {
    pub(crate) url: String,
    pub(crate) admin: String,
    pub(crate) state: AppState,
    pub(crate) http: reqwest::Client,
    pub(crate) database_url: String,
    cancel: CancellationToken,
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

impl Server {
    /// Stops serving and the background tasks (evaluator, refresh), keeping the data dir: a
    /// replica going away while another uses the same database.
    pub(crate) fn stop(&self) {
        self.cancel.cancel();
    }
}

pub(crate) async fn start(engine: Engine) -> Server {
    start_with(engine, |_| {}).await
}

pub(crate) async fn start_with(engine: Engine, tweak: impl FnOnce(&mut Config)) -> Server {
    let dir = tempfile::tempdir().expect("tmp");
    // Tests drive the evaluator and the flushes themselves.
    let mut config = Config {
        data_dir: dir.path().to_path_buf(),
        evaluator_interval: Duration::from_secs(3600),
        last_seen_flush: Duration::from_secs(3600),
        cache_refresh: Duration::from_secs(3600),
        ..Config::default()
    };
    config.rate_limits.checks_per_minute = 1_000_000;
    config.rate_limits.enrolls_per_minute = 1_000_000;
    if engine == Engine::Postgres {
        config.database_url = Some(flotilla_coordinator::config::Secret::new(pg_database().await));
    }
    tweak(&mut config);
    let tls = config.tls_cert.is_some();
    let database_url = config.database_url();
    let state = flotilla_coordinator::server::build_state(config).await.expect("coordinator starts");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let scheme = if tls { "https" } else { "http" };
    let url = format!("{scheme}://{}", listener.local_addr().expect("addr"));
    let cancel = CancellationToken::new();
    tokio::spawn(flotilla_coordinator::server::serve(state.clone(), listener, cancel.clone()));
    // A second replica on an existing database finds an admin already and writes no file.
    let admin = std::fs::read_to_string(dir.path().join("admin-token")).unwrap_or_default();
    Server { url, admin, state, http: http_client(tls), database_url, cancel, _dir: dir }
}

/// The test CA, server certificate (localhost, 127.0.0.1) and key under tests/fixtures/tls.
pub(crate) fn tls_fixture(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tls").join(name)
}

/// A client; one that trusts the test CA when the server speaks TLS.
pub(crate) fn http_client(tls: bool) -> reqwest::Client {
    flotilla_coordinator::tls::install_crypto_provider();
    let mut b = reqwest::Client::builder();
    if tls {
        let ca = std::fs::read(tls_fixture("ca.pem")).expect("test CA");
        b = b.add_root_certificate(reqwest::Certificate::from_pem(&ca).expect("CA parses"));
    }
    b.build().expect("client")
}

/// Keys of one product.
pub(crate) struct Keys {
    pub(crate) root: SigningKey,
    pub(crate) release: SigningKey,
}

impl Keys {
    pub(crate) fn new(seed: u8) -> Self {
        Self {
            root: SigningKey::from_ed25519_seed(&[seed; 32]),
            release: SigningKey::from_ed25519_seed(&[seed + 100; 32]),
        }
    }
}

pub(crate) fn far_future() -> Timestamp {
    "2040-01-01T00:00:00Z".parse().expect("ts")
}

impl Server {
    pub(crate) async fn req(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut r = self.http.request(method, format!("{}{path}", self.url));
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        if let Some(b) = body {
            r = r.json(&b);
        }
        let resp = r.send().await.expect("request");
        let status = resp.status();
        let text = resp.text().await.expect("body");
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    pub(crate) async fn post(&self, path: &str, token: Option<&str>, body: Value) -> (StatusCode, Value) {
        self.req(reqwest::Method::POST, path, token, Some(body)).await
    }

    pub(crate) async fn get(&self, path: &str, token: Option<&str>) -> (StatusCode, Value) {
        self.req(reqwest::Method::GET, path, token, None).await
    }

    /// The product's trust root, listing this coordinator's rollout key.
    pub(crate) fn trust_root(&self, keys: &Keys) -> String {
        let doc = RootDocument::new(
            1,
            far_future(),
            (&[keys.root.public_key()], 1),
            (&[keys.release.public_key()], 1),
            (&[self.state.rollout_key.public_key()], 1),
        );
        String::from_utf8(doc.sign(&[&keys.root]).expect("sign").to_json()).expect("utf-8")
    }

    /// Creates a product; returns its publish API key.
    pub(crate) async fn create_product(&self, name: &str, keys: &Keys, secret: &str) -> String {
        let (status, body) = self
            .post(
                "/v1/products",
                Some(&self.admin),
                json!({ "name": name, "trust_root": self.trust_root(keys), "enrollment_secret": secret }),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        body["api_key"].as_str().expect("api key").to_owned()
    }

    pub(crate) async fn enroll(
        &self,
        product: &str,
        device: &str,
        channel: &str,
        secret: &str,
        hardware: Option<&str>,
    ) -> String {
        let (status, body) = self
            .post(
                "/v1/devices/enroll",
                None,
                json!({ "device_id": device, "product": product, "channel": channel, "enrollment_secret": secret, "hardware": hardware }),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        body["token"].as_str().expect("token").to_owned()
    }

    /// Uploads what the server lacks of an image and returns the signed manifest envelope.
    pub(crate) async fn upload(&self, api_key: &str, image: &[u8]) -> (flotilla_core::chunking::ChunkedImage, usize) {
        let chunked = Chunker::new(ChunkParams::BUNDLE).chunk_reader(image).expect("chunk");
        let ids: Vec<String> = chunked.index.entries().iter().map(|e| e.id.to_hex()).collect();
        let (status, body) = self.post("/v1/chunks/missing", Some(api_key), json!({ "ids": ids })).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let missing: Vec<String> = serde_json::from_value(body["missing"].clone()).expect("missing list");
        for (offset, e) in chunked.index.iter_with_offsets() {
            if !missing.contains(&e.id.to_hex()) {
                continue;
            }
            let data = &image[offset as usize..offset as usize + e.len as usize];
            let resp = self
                .http
                .put(format!("{}/v1/chunks/{}?len={}", self.url, e.id, e.len))
                .bearer_auth(api_key)
                .body(object::encode(data, object::DEFAULT_LEVEL))
                .send()
                .await
                .expect("put chunk");
            assert_eq!(resp.status(), StatusCode::CREATED);
        }
        let resp = self
            .http
            .put(format!("{}/v1/indexes/{}", self.url, chunked.index.id()))
            .bearer_auth(api_key)
            .body(chunked.index.encode())
            .send()
            .await
            .expect("put index");
        assert_eq!(resp.status(), StatusCode::CREATED);
        (chunked, missing.len())
    }

    /// Uploads and publishes; returns (status, body).
    pub(crate) async fn publish(
        &self,
        api_key: &str,
        m: &Manifest,
        keys: &Keys,
        rollout: Value,
    ) -> (StatusCode, Value) {
        let env = m.sign(&[&keys.release]).expect("sign manifest");
        let manifest = String::from_utf8(env.to_json()).expect("utf-8");
        self.post(
            "/v1/releases",
            Some(api_key),
            json!({ "product": m.product, "manifest": manifest, "rollout": rollout }),
        )
        .await
    }
}

/// A manifest for `image` after it was chunked.
pub(crate) fn manifest_for(
    product: &str,
    channel: &str,
    version: &str,
    code: u64,
    chunked: &flotilla_core::chunking::ChunkedImage,
) -> Manifest {
    Manifest {
        schema_version: 1,
        product: product.into(),
        channel: channel.into(),
        version: version.parse().expect("semver"),
        version_code: code,
        security_version: 0,
        payload: Payload {
            kind: PayloadKind::Raw,
            size: chunked.index.image_size(),
            sha256: chunked.sha256,
            blake3: chunked.blake3,
        },
        chunking: chunked.index.params(),
        index: IndexRef { id: chunked.index.id(), size: chunked.index.encoded_len() },
        deltas: vec![],
        compatibility: Compatibility::default(),
        mandatory: false,
        created_at: Timestamp::now(),
        expires_at: far_future(),
        notes: None,
    }
}

pub(crate) fn image(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|i| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            if (i / 8192) % 2 == 0 { (x >> 30) as u8 } else { b"ota "[i % 4] }
        })
        .collect()
}

/// Publishes `image` as version/code at `rollout`; returns the release id.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn release(
    server: &Server,
    api_key: &str,
    keys: &Keys,
    product: &str,
    version: &str,
    code: u64,
    img: &[u8],
    rollout: Value,
) -> i64 {
    let (chunked, _) = server.upload(api_key, img).await;
    let m = manifest_for(product, "stable", version, code, &chunked);
    let (status, body) = server.publish(api_key, &m, keys, rollout).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    body["id"].as_i64().expect("id")
}

/// Polls `probe` until it returns `Some`, failing the test with `what` after `limit`.
pub(crate) async fn wait_for<T, F, Fut>(what: &str, limit: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
