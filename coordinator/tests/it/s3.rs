//! S3 storage against a real S3-protocol server in-process (s3s + s3s-fs over hyper): the
//! publish → check → download flow with objects in a bucket, presigned redirects, tampered
//! and missing objects, and start-up refusing wrong credentials or a missing bucket.

use flotilla_coordinator::config::{S3Config, Secret, StorageConfig};
use flotilla_coordinator::storage::{ObjectKind, S3Store, object_key};
use flotilla_core::manifest::{DeviceContext, verify_for_device};
use flotilla_core::object;
use flotilla_core::time::Timestamp;
use flotilla_core::trust::TrustRoot;
use reqwest::StatusCode;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::support::{Engine, Keys, Server, image, release, start_with};

const SECRET: &str = "enroll-secret-0123456789";
const ACCESS_KEY: &str = "FLOTILLATESTKEY";
const SECRET_KEY: &str = "flotilla-test-secret-0123456789";
const BUCKET: &str = "ota-objects";
const PREFIX: &str = "fleet-a";

/// An S3-protocol server on a loopback port, storing objects in a temp dir.
struct S3Server {
    url: String,
    cancel: CancellationToken,
    _dir: tempfile::TempDir,
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

impl S3Server {
    async fn start() -> Self {
        let dir = tempfile::tempdir().expect("tmp");
        let fs = s3s_fs::FileSystem::new(dir.path()).expect("s3s-fs root");
        let mut builder = s3s::service::S3ServiceBuilder::new(fs);
        builder.set_auth(s3s::auth::SimpleAuth::from_single(ACCESS_KEY, SECRET_KEY));
        let service = builder.build();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let cancel = CancellationToken::new();
        let stop = cancel.clone();
        tokio::spawn(async move {
            loop {
                let stream = tokio::select! {
                    _ = stop.cancelled() => break,
                    accepted = listener.accept() => match accepted {
                        Ok((stream, _)) => stream,
                        Err(_) => continue,
                    },
                };
                let service = service.clone();
                tokio::spawn(async move {
                    let io = hyper_util::rt::TokioIo::new(stream);
                    let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, service).await;
                });
            }
        });
        let server = Self { url, cancel, _dir: dir };
        server
            .store(ACCESS_KEY, SECRET_KEY)
            .client()
            .create_bucket()
            .bucket(BUCKET)
            .send()
            .await
            .expect("create bucket");
        server
    }

    fn config(&self, key: &str, secret: &str) -> S3Config {
        S3Config {
            bucket: BUCKET.into(),
            endpoint: Some(self.url.clone()),
            prefix: PREFIX.into(),
            access_key_id: Some(key.into()),
            secret_access_key: Some(Secret::new(secret)),
            ..S3Config::default()
        }
    }

    /// A client of the bucket, as the test's own view of what is stored.
    fn store(&self, key: &str, secret: &str) -> S3Store {
        S3Store::new(&self.config(key, secret)).expect("store")
    }

    async fn object(&self, key: &str) -> Option<Vec<u8>> {
        let store = self.store(ACCESS_KEY, SECRET_KEY);
        match store.client().get_object().bucket(BUCKET).key(store.bucket_key(key)).send().await {
            Ok(out) => Some(out.body.collect().await.expect("body").into_bytes().to_vec()),
            Err(e) if e.as_service_error().is_some_and(|e| e.is_no_such_key()) => None,
            Err(e) => panic!("get {key}: {e:?}"),
        }
    }

    async fn overwrite(&self, key: &str, bytes: Vec<u8>) {
        let store = self.store(ACCESS_KEY, SECRET_KEY);
        store
            .client()
            .put_object()
            .bucket(BUCKET)
            .key(store.bucket_key(key))
            .body(bytes.into())
            .send()
            .await
            .expect("overwrite");
    }
}

async fn coordinator(engine: Engine, s3: &S3Server, presign: bool) -> Server {
    let storage = StorageConfig::S3(s3.config(ACCESS_KEY, SECRET_KEY));
    start_with(engine, |c| {
        c.storage = storage;
        c.presign_downloads = presign;
    })
    .await
}

/// A client that shows redirects instead of following them.
fn no_redirects() -> reqwest::Client {
    flotilla_coordinator::tls::install_crypto_provider();
    reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().expect("client")
}

/// Publish, check and install with every object in the bucket and the coordinator proxying
/// downloads (Range included); the objects sit under the configured prefix.
async fn s3_publish_check_install(engine: Engine) {
    let s3 = S3Server::start().await;
    let s = coordinator(engine, &s3, false).await;
    let keys = Keys::new(11);
    let api = s.create_product("s3board", &keys, SECRET).await;
    let device = s.enroll("s3board", "dev-s3", "stable", SECRET, None).await;
    let img = image(21, 500_000);
    let id = release(&s, &api, &keys, "s3board", "1.0.0", 1, &img, json!({ "percent": 100 })).await;

    let (status, offer) = s.get("/v1/updates/check?nonce=n1", Some(&device)).await;
    assert_eq!(status, StatusCode::OK, "{offer}");
    assert_eq!(offer["release_id"], id);
    let root = TrustRoot::from_trusted_json(s.trust_root(&keys).as_bytes()).expect("root");
    let manifest = verify_for_device(
        offer["manifest"].as_str().expect("manifest").as_bytes(),
        &root,
        &DeviceContext::new("s3board", "stable", Timestamp::now()),
    )
    .expect("manifest verifies");

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
    assert_eq!(
        s3.object(&object_key(ObjectKind::Index, &index.id().to_hex())).await.as_deref(),
        Some(&index_bytes[..]),
        "the index is in the bucket under the prefix"
    );
    let mut rebuilt = Vec::new();
    for e in index.entries() {
        let resp = s.http.get(format!("{}/v1/chunks/{}", s.url, e.id)).send().await.expect("chunk");
        assert_eq!(resp.status(), StatusCode::OK);
        let bytes = resp.bytes().await.expect("bytes");
        let stored = s3.object(&object_key(ObjectKind::Chunk, &e.id.to_hex())).await.expect("chunk in the bucket");
        assert_eq!(stored, bytes, "the coordinator serves the stored object as is");
        rebuilt.extend(object::decode(&bytes, &e.id, e.len).expect("chunk verifies"));
    }
    assert_eq!(rebuilt, img);

    // Ranges go to the store as Range requests.
    let first = index.entries()[0].id;
    let whole = s3.object(&object_key(ObjectKind::Chunk, &first.to_hex())).await.expect("stored");
    let resp =
        s.http.get(format!("{}/v1/chunks/{first}", s.url)).header("range", "bytes=5-14").send().await.expect("range");
    assert_eq!(resp.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(resp.headers()["content-range"], format!("bytes 5-14/{}", whole.len()));
    assert_eq!(resp.bytes().await.expect("bytes"), whole[5..15]);
    let resp = s.http.head(format!("{}/v1/chunks/{first}", s.url)).send().await.expect("head");
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["content-length"], whole.len().to_string().as_str(), "HEAD gives the object's size");
    let resp =
        s.http.head(format!("{}/v1/chunks/{first}", s.url)).header("range", "bytes=5-14").send().await.expect("head");
    assert_eq!(resp.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(resp.headers()["content-length"], "10");
    assert_eq!(resp.headers()["content-range"], format!("bytes 5-14/{}", whole.len()));
    let resp =
        s.http.get(format!("{}/v1/chunks/{first}", s.url)).header("range", "bytes=3-").send().await.expect("range");
    assert_eq!(resp.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(resp.bytes().await.expect("bytes"), whole[3..]);
    let resp = s
        .http
        .get(format!("{}/v1/chunks/{first}", s.url))
        .header("range", format!("bytes={}-", whole.len() + 10))
        .send()
        .await
        .expect("range");
    assert_eq!(resp.status(), StatusCode::RANGE_NOT_SATISFIABLE);

    // A missing object is a 404 from the coordinator, not an error.
    let absent = "ab".repeat(32);
    let (status, body) = s.get(&format!("/v1/chunks/{absent}"), None).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert_eq!(body["error"]["code"], "not_found");
    let (status, _) = s.get(&format!("/v1/indexes/{absent}"), None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // A second release re-uses what the bucket holds: the server answers "missing" from its table.
    let mut v2 = img.clone();
    v2[100_000..100_016].copy_from_slice(b"sixteen bytes!!!");
    let (_, sent) = s.upload(&api, &v2).await;
    assert!(sent <= 3, "only the edited chunks are uploaded again, sent {sent}");
}

/// With presigned downloads the coordinator answers 302 to a URL on the S3 server that works
/// without any token and returns the exact object; a tampered object is caught by the device's
/// own verification; a missing one ends in 404.
async fn s3_presigned_downloads(engine: Engine) {
    let s3 = S3Server::start().await;
    let s = coordinator(engine, &s3, true).await;
    let keys = Keys::new(12);
    let api = s.create_product("s3app", &keys, SECRET).await;
    let device = s.enroll("s3app", "dev-p", "stable", SECRET, None).await;
    let img = image(22, 300_000);
    release(&s, &api, &keys, "s3app", "1.0.0", 1, &img, json!({ "percent": 100 })).await;
    let (status, offer) = s.get("/v1/updates/check?nonce=n2", Some(&device)).await;
    assert_eq!(status, StatusCode::OK, "{offer}");

    let http = no_redirects();
    // The index redirects too.
    let resp =
        http.get(format!("{}{}", s.url, offer["index"]["url"].as_str().expect("url"))).send().await.expect("index");
    assert_eq!(resp.status(), StatusCode::FOUND);
    let location = resp.headers()["location"].to_str().expect("ascii").to_owned();
    assert!(location.starts_with(&format!("{}/{BUCKET}/{PREFIX}/indexes/", s3.url)), "{location}");
    let index_bytes = http.get(&location).send().await.expect("presigned index").bytes().await.expect("bytes");
    let root = TrustRoot::from_trusted_json(s.trust_root(&keys).as_bytes()).expect("root");
    let manifest = verify_for_device(
        offer["manifest"].as_str().expect("manifest").as_bytes(),
        &root,
        &DeviceContext::new("s3app", "stable", Timestamp::now()),
    )
    .expect("manifest verifies");
    let index = manifest.check_index(&index_bytes).expect("index from the presigned URL matches");

    let mut rebuilt = Vec::new();
    for e in index.entries() {
        let resp = http.get(format!("{}/v1/chunks/{}", s.url, e.id)).send().await.expect("chunk");
        assert_eq!(resp.status(), StatusCode::FOUND);
        let location = resp.headers()["location"].to_str().expect("ascii").to_owned();
        assert!(location.starts_with(&format!("{}/{BUCKET}/{PREFIX}/chunks/", s3.url)), "{location}");
        assert!(location.contains("X-Amz-Signature="), "a presigned URL: {location}");
        // No Authorization header: the URL alone is the credential.
        let resp = http.get(&location).send().await.expect("presigned chunk");
        assert_eq!(resp.status(), StatusCode::OK);
        let bytes = resp.bytes().await.expect("bytes");
        let stored = s3.object(&object_key(ObjectKind::Chunk, &e.id.to_hex())).await.expect("stored");
        assert_eq!(bytes, stored, "the presigned URL returns the exact object");
        rebuilt.extend(object::decode(&bytes, &e.id, e.len).expect("chunk verifies"));
    }
    assert_eq!(rebuilt, img);

    // The presigned URL is for that key only: pointing it at another key breaks the signature.
    let entries = index.entries();
    let resp = http.get(format!("{}/v1/chunks/{}", s.url, entries[0].id)).send().await.expect("chunk");
    let location = resp.headers()["location"].to_str().expect("ascii").to_owned();
    let forged = location.replace(&entries[0].id.to_hex(), &entries[1].id.to_hex());
    let resp = http.get(&forged).send().await.expect("forged");
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    // And the bucket itself is not public.
    let unsigned = location.split_once('?').expect("query").0;
    assert_eq!(http.get(unsigned).send().await.expect("unsigned").status(), StatusCode::FORBIDDEN);

    // Someone with bucket access swaps a chunk's bytes for another valid object: the download
    // still "works", and the device's verification against the chunk id refuses it.
    let (victim, other) = (&entries[0], &entries[1]);
    let foreign = s3.object(&object_key(ObjectKind::Chunk, &other.id.to_hex())).await.expect("stored");
    s3.overwrite(&object_key(ObjectKind::Chunk, &victim.id.to_hex()), foreign).await;
    let resp = http.get(format!("{}/v1/chunks/{}", s.url, victim.id)).send().await.expect("chunk");
    let location = resp.headers()["location"].to_str().expect("ascii").to_owned();
    let tampered = http.get(&location).send().await.expect("tampered").bytes().await.expect("bytes");
    assert!(object::decode(&tampered, &victim.id, victim.len).is_err(), "a swapped object fails verification");
    // Flipped bits too.
    let mut flipped = s3.object(&object_key(ObjectKind::Chunk, &other.id.to_hex())).await.expect("stored");
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0x40;
    s3.overwrite(&object_key(ObjectKind::Chunk, &other.id.to_hex()), flipped).await;
    let resp = http.get(format!("{}/v1/chunks/{}", s.url, other.id)).send().await.expect("chunk");
    let location = resp.headers()["location"].to_str().expect("ascii").to_owned();
    let tampered = http.get(&location).send().await.expect("tampered").bytes().await.expect("bytes");
    assert!(object::decode(&tampered, &other.id, other.len).is_err(), "a corrupted object fails verification");

    // A missing object is a 404 from the coordinator itself, not a redirect to the bucket's.
    let absent = "cd".repeat(32);
    for path in [format!("/v1/chunks/{absent}"), format!("/v1/indexes/{absent}")] {
        let resp = http.get(format!("{}{path}", s.url)).send().await.expect("missing");
        assert_eq!(resp.status(), StatusCode::NOT_FOUND, "{path}");
        assert!(resp.headers().get("location").is_none(), "{path}");
    }
    // A chunk id stored as an index (or the other way round) is not stored as a chunk.
    let index_id = offer["index"]["url"].as_str().expect("url").rsplit('/').next().expect("id").to_owned();
    let resp = http.get(format!("{}/v1/chunks/{index_id}", s.url)).send().await.expect("kind");
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    // A malformed id is refused before any redirect.
    let resp = http.get(format!("{}/v1/chunks/not-an-id", s.url)).send().await.expect("chunk");
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
}

/// Wrong credentials or a missing bucket stop start-up with a message naming the problem.
async fn s3_misconfiguration_is_refused_at_start(engine: Engine) {
    let s3 = S3Server::start().await;
    let start = |s3config: S3Config| async move {
        let dir = tempfile::tempdir().expect("tmp");
        let mut config = flotilla_coordinator::config::Config {
            data_dir: dir.path().to_path_buf(),
            storage: StorageConfig::S3(s3config),
            ..Default::default()
        };
        if engine == Engine::Postgres {
            config.database_url = Some(Secret::new(crate::support::pg_database().await));
        }
        match flotilla_coordinator::server::build_state(config).await {
            Ok(_) => panic!("started with a broken S3 configuration"),
            Err(e) => e.to_string(),
        }
    };
    let wrong_secret = start(s3.config(ACCESS_KEY, "not-the-secret")).await;
    assert!(wrong_secret.contains("refused access") && wrong_secret.contains(BUCKET), "{wrong_secret}");
    assert!(wrong_secret.contains("AWS_SECRET_ACCESS_KEY"), "{wrong_secret}");
    let unknown_key = start(s3.config("NOSUCHKEY", SECRET_KEY)).await;
    assert!(unknown_key.contains("refused access"), "{unknown_key}");
    let no_bucket = start(S3Config { bucket: "no-such-bucket".into(), ..s3.config(ACCESS_KEY, SECRET_KEY) }).await;
    assert!(no_bucket.contains("does not exist") && no_bucket.contains("no-such-bucket"), "{no_bucket}");
    let closed = {
        let port = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind").local_addr().expect("addr");
        start(S3Config { endpoint: Some(format!("http://{port}")), ..s3.config(ACCESS_KEY, SECRET_KEY) }).await
    };
    assert!(closed.contains("cannot be reached"), "{closed}");
    let no_credentials = start(S3Config { access_key_id: None, ..s3.config(ACCESS_KEY, SECRET_KEY) }).await;
    assert!(no_credentials.contains("AWS_ACCESS_KEY_ID"), "{no_credentials}");
}

crate::both_engines!(s3_publish_check_install, s3_presigned_downloads, s3_misconfiguration_is_refused_at_start);
