//! Update-check benchmark (DESIGN.md target: P99 ≤ 5 ms and P50 ≤ 1 ms at 2 000 requests/s on
//! one 2-core machine, with SQLite and with PostgreSQL).
//!
//! For each engine it starts the real coordinator in-process (`build_state` + `serve`, on its
//! own 2-thread runtime), enrolls 1 000 devices, publishes a release to 100 %, and drives
//! `GET /v1/updates/check` over HTTP: every check carries a nonce, so every answer is a full
//! offer with a freshly signed assignment (the most expensive answer there is).
//! - open loop: 2 000 requests/s for 10 s on a fixed timetable; latency is measured from
//!   each request's scheduled time, so a stalled server cannot hide its queue (no
//!   coordinated omission);
//! - closed loop: as fast as it goes with `CONNECTIONS` connections, for the maximum rate.
//!
//! A trivial axum endpoint on the same machine, driven the same way, is the ceiling (what the
//! HTTP stack and this load generator can do at all). PostgreSQL comes from
//! `FLOTILLA_TEST_PG_URL`; when it is unset the bench starts a throwaway cluster with
//! `scripts/pg.sh`. The last line is machine-readable:
//! `update_check: sqlite_p99_ms=… postgres_p99_ms=… max_rps=… ceiling_rps=…` where `max_rps` is
//! the lower of the two engines' closed-loop rates.
//!
//! Run: `cargo bench -p flotilla-coordinator --bench update_check`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use flotilla_coordinator::config::{Config, Secret};
use flotilla_core::chunking::{ChunkParams, Chunker};
use flotilla_core::keys::SigningKey;
use flotilla_core::manifest::{Compatibility, IndexRef, Manifest, Payload, PayloadKind};
use flotilla_core::object;
use flotilla_core::time::Timestamp;
use flotilla_core::trust::RootDocument;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

/// Enrolled devices; checks go round-robin over them.
const DEVICES: usize = 1_000;
/// The target rate of the open-loop run.
const RATE: u64 = 2_000;
/// Length of the open-loop run.
const OPEN_LOOP: Duration = Duration::from_secs(10);
/// Length of each closed-loop run.
const CLOSED_LOOP: Duration = Duration::from_secs(5);
/// Connections of the closed-loop runs.
const CONNECTIONS: usize = 32;
/// Most requests in flight in the open-loop run; more would wait (and count as late).
const OPEN_LOOP_WORKERS: usize = 64;
/// Untimed traffic before measuring: pools, caches and the page cache warm up.
const WARM_UP: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Engine {
    Sqlite,
    Postgres,
}

impl Engine {
    fn name(self) -> &'static str {
        match self {
            Self::Sqlite => "sqlite",
            Self::Postgres => "postgres",
        }
    }
}

/// Latency figures of one run, in milliseconds, and the achieved rate.
#[derive(Debug, Clone, Copy)]
struct Figures {
    p50: f64,
    p99: f64,
    max: f64,
    rps: f64,
    sent: usize,
    failed: usize,
}

fn figures(mut micros: Vec<u64>, failed: usize, elapsed: Duration) -> Figures {
    micros.sort_unstable();
    let at = |q: f64| {
        if micros.is_empty() {
            return f64::NAN;
        }
        let i = ((micros.len() as f64 * q).ceil() as usize).clamp(1, micros.len()) - 1;
        micros[i] as f64 / 1000.0
    };
    let sent = micros.len() + failed;
    Figures {
        p50: at(0.50),
        p99: at(0.99),
        max: micros.last().map_or(f64::NAN, |m| *m as f64 / 1000.0),
        rps: micros.len() as f64 / elapsed.as_secs_f64(),
        sent,
        failed,
    }
}

/// A GET target: a URL and the bearer header to send, if any.
#[derive(Clone)]
struct Target {
    url: String,
    auth: Option<String>,
}

/// Sends one request; true when the answer had the expected status.
async fn hit(http: &reqwest::Client, target: &Target, nonce: u64, expect: reqwest::StatusCode) -> bool {
    let url = if target.auth.is_some() {
        format!("{}?nonce={nonce:016x}&version_code=0", target.url)
    } else {
        target.url.clone()
    };
    let mut req = http.get(url);
    if let Some(auth) = &target.auth {
        req = req.header(reqwest::header::AUTHORIZATION, auth);
    }
    match req.send().await {
        Ok(resp) if resp.status() == expect => resp.bytes().await.is_ok(),
        _ => false,
    }
}

/// Open loop: request `i` is due at `start + i / RATE`; a precise timer thread releases each
/// request at its time and workers send it; latency counts from the due time.
async fn open_loop(http: &reqwest::Client, targets: &[Target], expect: reqwest::StatusCode) -> Figures {
    let total = (RATE * OPEN_LOOP.as_secs()) as usize;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<(usize, Instant)>();
    let start = Instant::now() + Duration::from_millis(50);
    let period = Duration::from_nanos(1_000_000_000 / RATE);
    // std::thread::sleep is accurate to tens of microseconds; tokio's timer rounds to 1 ms.
    let timer = std::thread::spawn(move || {
        for i in 0..total {
            let due = start + period * i as u32;
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            if tx.send((i, due)).is_err() {
                break;
            }
        }
    });
    let rx = Arc::new(tokio::sync::Mutex::new(rx));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..OPEN_LOOP_WORKERS {
        let (rx, http, targets) = (rx.clone(), http.clone(), targets.to_vec());
        workers.spawn(async move {
            let (mut micros, mut failed) = (Vec::with_capacity(total / OPEN_LOOP_WORKERS * 2), 0usize);
            loop {
                let next = rx.lock().await.recv().await;
                let Some((i, due)) = next else { break };
                if hit(&http, &targets[i % targets.len()], i as u64, expect).await {
                    micros.push(due.elapsed().as_micros() as u64);
                } else {
                    failed += 1;
                }
            }
            (micros, failed)
        });
    }
    let (mut micros, mut failed) = (Vec::with_capacity(total), 0);
    while let Some(done) = workers.join_next().await {
        let (m, f) = done.expect("worker");
        micros.extend(m);
        failed += f;
    }
    let elapsed = start.elapsed();
    timer.join().expect("timer thread");
    figures(micros, failed, elapsed)
}

/// Closed loop: `CONNECTIONS` senders, each sending its next request when the last answered.
async fn closed_loop(
    http: &reqwest::Client,
    targets: &[Target],
    expect: reqwest::StatusCode,
    length: Duration,
) -> Figures {
    let start = Instant::now();
    let end = start + length;
    let mut senders = tokio::task::JoinSet::new();
    for c in 0..CONNECTIONS {
        let (http, targets) = (http.clone(), targets.to_vec());
        senders.spawn(async move {
            let (mut micros, mut failed, mut i) = (Vec::new(), 0usize, c);
            while Instant::now() < end {
                let sent = Instant::now();
                if hit(&http, &targets[i % targets.len()], i as u64, expect).await {
                    micros.push(sent.elapsed().as_micros() as u64);
                } else {
                    failed += 1;
                }
                i += CONNECTIONS;
            }
            (micros, failed)
        });
    }
    let (mut micros, mut failed) = (Vec::new(), 0);
    while let Some(done) = senders.join_next().await {
        let (m, f) = done.expect("sender");
        micros.extend(m);
        failed += f;
    }
    figures(micros, failed, start.elapsed())
}

fn print(label: &str, f: &Figures) {
    println!(
        "{label:<32} p50 {:>7.3} ms  p99 {:>7.3} ms  max {:>8.3} ms  {:>8.0} req/s  ({} sent, {} failed)",
        f.p50, f.p99, f.max, f.rps, f.sent, f.failed
    );
}

/// A throwaway PostgreSQL: `FLOTILLA_TEST_PG_URL`, else a cluster started by scripts/pg.sh
/// (stopped again on drop).
struct Postgres {
    url: String,
    started_dir: Option<String>,
}

impl Postgres {
    fn get() -> Self {
        if let Ok(url) = std::env::var("FLOTILLA_TEST_PG_URL") {
            return Self { url, started_dir: None };
        }
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/pg.sh");
        eprintln!("FLOTILLA_TEST_PG_URL is unset: starting PostgreSQL with {script}");
        let out = std::process::Command::new("bash").args([script, "start"]).output().unwrap_or_else(|e| {
            panic!("cannot run {script}: {e}; set FLOTILLA_TEST_PG_URL to a PostgreSQL server instead")
        });
        assert!(
            out.status.success(),
            "{script} start failed (set FLOTILLA_TEST_PG_URL to a PostgreSQL server instead):\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let var = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("export {name}=")).map(str::to_owned))
                .unwrap_or_else(|| panic!("{script} printed no {name}: {text}"))
        };
        Self { url: var("FLOTILLA_TEST_PG_URL"), started_dir: Some(var("FLOTILLA_TEST_PG_DIR")) }
    }

    /// A new, empty database on the server.
    async fn database(&self) -> String {
        sqlx::any::install_default_drivers();
        let mut suffix = [0u8; 6];
        getrandom::fill(&mut suffix).expect("random");
        let name = format!("flotilla_bench_{}", hex::encode(suffix));
        let mut conn = <sqlx::AnyConnection as sqlx::Connection>::connect(&self.url)
            .await
            .unwrap_or_else(|e| panic!("cannot connect to PostgreSQL at FLOTILLA_TEST_PG_URL: {e}"));
        sqlx::Executor::execute(&mut conn, sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .await
            .expect("create database");
        let (prefix, _) = self.url.rsplit_once('/').expect("database URL with a path");
        format!("{prefix}/{name}")
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if let Some(dir) = &self.started_dir {
            let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/pg.sh");
            let _ = std::process::Command::new("bash").args([script, "stop", dir]).status();
        }
    }
}

/// A server on its own runtime (2 worker threads, like the 2-core machine of the target).
struct Served {
    url: String,
    cancel: CancellationToken,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Drop for Served {
    fn drop(&mut self) {
        self.cancel.cancel();
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_timeout(Duration::from_secs(5));
        }
    }
}

fn server_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("server runtime")
}

fn serve_coordinator(config: Config) -> (Served, flotilla_coordinator::state::AppState) {
    let runtime = server_runtime();
    let cancel = CancellationToken::new();
    let (url, state) = runtime.block_on(async {
        let state = flotilla_coordinator::server::build_state(config).await.expect("coordinator starts");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        tokio::spawn(flotilla_coordinator::server::serve(state.clone(), listener, cancel.clone()));
        (url, state)
    });
    (Served { url, cancel, runtime: Some(runtime) }, state)
}

fn serve_ceiling() -> Served {
    let runtime = server_runtime();
    let cancel = CancellationToken::new();
    let url = runtime.block_on(async {
        let app = axum::Router::new().route("/ping", axum::routing::get(|| async { "ok" }));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let stop = cancel.clone();
        tokio::spawn(async move { axum::serve(listener, app).with_graceful_shutdown(stop.cancelled_owned()).await });
        url
    });
    Served { url, cancel, runtime: Some(runtime) }
}

async fn post(http: &reqwest::Client, url: String, token: Option<&str>, body: Value) -> Value {
    let mut req = http.post(url).json(&body);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await.expect("request");
    let status = resp.status();
    let body: Value = resp.json().await.unwrap_or(Value::Null);
    assert!(status.is_success(), "{status}: {body}");
    body
}

/// Product, 1 000 devices, one release at 100 %; returns the devices' check targets.
async fn set_up(http: &reqwest::Client, url: &str, admin: &str, rollout_key: &SigningKey) -> Vec<Target> {
    let root_key = SigningKey::from_ed25519_seed(&[1; 32]);
    let release_key = SigningKey::from_ed25519_seed(&[2; 32]);
    let far: Timestamp = "2040-01-01T00:00:00Z".parse().expect("ts");
    let doc = RootDocument::new(
        1,
        far,
        (&[root_key.public_key()], 1),
        (&[release_key.public_key()], 1),
        (&[rollout_key.public_key()], 1),
    );
    let root = String::from_utf8(doc.sign(&[&root_key]).expect("sign root").to_json()).expect("utf-8");
    let secret = "bench-enrollment-secret-0123";
    let product = post(
        http,
        format!("{url}/v1/products"),
        Some(admin),
        json!({ "name": "bench", "trust_root": root, "enrollment_secret": secret }),
    )
    .await;
    let api = product["api_key"].as_str().expect("api key").to_owned();

    let mut enrolls = tokio::task::JoinSet::new();
    for worker in 0..8 {
        let (http, url) = (http.clone(), url.to_owned());
        enrolls.spawn(async move {
            let mut tokens = Vec::new();
            for d in (worker..DEVICES).step_by(8) {
                let body = json!({ "device_id": format!("bench-{d:04}"), "product": "bench", "channel": "stable", "enrollment_secret": secret, "version_code": 0 });
                let answer = post(&http, format!("{url}/v1/devices/enroll"), None, body).await;
                tokens.push(answer["token"].as_str().expect("token").to_owned());
            }
            tokens
        });
    }
    let mut targets = Vec::with_capacity(DEVICES);
    while let Some(tokens) = enrolls.join_next().await {
        for t in tokens.expect("enroll") {
            targets.push(Target { url: format!("{url}/v1/updates/check"), auth: Some(format!("Bearer {t}")) });
        }
    }

    // A 256 KiB image: a typical manifest and index, which is what the check answers carry.
    let image: Vec<u8> = (0..256 * 1024u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    let chunked = Chunker::new(ChunkParams::BUNDLE).chunk_reader(&image[..]).expect("chunk");
    for (offset, e) in chunked.index.iter_with_offsets() {
        let data = &image[offset as usize..offset as usize + e.len as usize];
        let resp = http
            .put(format!("{url}/v1/chunks/{}?len={}", e.id, e.len))
            .bearer_auth(&api)
            .body(object::encode(data, object::DEFAULT_LEVEL))
            .send()
            .await
            .expect("put chunk");
        assert!(resp.status().is_success(), "chunk upload: {}", resp.status());
    }
    let resp = http
        .put(format!("{url}/v1/indexes/{}", chunked.index.id()))
        .bearer_auth(&api)
        .body(chunked.index.encode())
        .send()
        .await
        .expect("put index");
    assert!(resp.status().is_success(), "index upload: {}", resp.status());
    let manifest = Manifest {
        schema_version: 1,
        product: "bench".into(),
        channel: "stable".into(),
        version: "1.0.0".parse().expect("semver"),
        version_code: 1,
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
        expires_at: far,
        notes: None,
    };
    let envelope = String::from_utf8(manifest.sign(&[&release_key]).expect("sign").to_json()).expect("utf-8");
    post(
        http,
        format!("{url}/v1/releases"),
        Some(&api),
        json!({ "product": "bench", "manifest": envelope, "rollout": { "percent": 100 } }),
    )
    .await;
    targets
}

fn client() -> reqwest::Client {
    flotilla_coordinator::tls::install_crypto_provider();
    reqwest::Client::builder().pool_max_idle_per_host(256).build().expect("client")
}

/// One engine: returns (open-loop figures, closed-loop figures).
fn bench_engine(engine: Engine, load: &tokio::runtime::Runtime, pg: Option<&Postgres>) -> (Figures, Figures) {
    let dir = tempfile::tempdir().expect("tmp");
    let mut config = Config {
        data_dir: dir.path().to_path_buf(),
        admin_token: Some(Secret::new("bench-admin-token-0123456789abcdef")),
        ..Config::default()
    };
    // Every request comes from 127.0.0.1: lift the per-client budgets.
    config.rate_limits.checks_per_minute = u32::MAX;
    config.rate_limits.enrolls_per_minute = u32::MAX;
    if let Some(pg) = pg {
        config.database_url = Some(Secret::new(load.block_on(pg.database())));
    }
    let (served, state) = serve_coordinator(config);
    let http = client();
    let targets = load.block_on(set_up(&http, &served.url, "bench-admin-token-0123456789abcdef", &state.rollout_key));
    let name = engine.name();
    let ok = reqwest::StatusCode::OK;
    load.block_on(closed_loop(&http, &targets, ok, WARM_UP));
    // The server's own timing of the check handler (its /metrics histogram sum and count).
    let m = &state.metrics;
    let timed = || {
        use std::sync::atomic::Ordering::Relaxed;
        (m.check_latency_sum_us.load(Relaxed), m.check_latency_count.load(Relaxed))
    };
    let handler_mean = |(s0, c0): (u64, u64), (s1, c1): (u64, u64)| (s1 - s0) / (c1 - c0).max(1);
    let before = timed();
    let open = load.block_on(open_loop(&http, &targets, ok));
    let between = timed();
    print(&format!("{name}: open loop {RATE} req/s"), &open);
    let closed = load.block_on(closed_loop(&http, &targets, ok, CLOSED_LOOP));
    print(&format!("{name}: closed loop, {CONNECTIONS} conns"), &closed);
    println!(
        "{name}: server-side mean handler time {} µs in the open loop, {} µs in the closed loop",
        handler_mean(before, between),
        handler_mean(between, timed())
    );
    // Batched last-seen writes run beside the checks every `last_seen_flush`: time one batch
    // of every device (the runs above touched each of them).
    let pending = state.last_seen.lock().map(|m| m.len()).unwrap_or(0);
    let started = Instant::now();
    let flushed =
        served.runtime.as_ref().expect("runtime").block_on(flotilla_coordinator::api::flush_last_seen(&state));
    println!(
        "{name}: last-seen flush of {pending} devices: {:.1} ms ({flushed:?})",
        started.elapsed().as_secs_f64() * 1000.0
    );
    drop(served);
    (open, closed)
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` would pass nothing useful either.
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let load =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("load runtime");
    println!(
        "update check: {DEVICES} devices, every check a signed offer; open loop {RATE} req/s for {}s, closed loop {}s",
        OPEN_LOOP.as_secs(),
        CLOSED_LOOP.as_secs()
    );
    let pg = Postgres::get();
    let (sqlite_open, sqlite_closed) = bench_engine(Engine::Sqlite, &load, None);
    let (pg_open, pg_closed) = bench_engine(Engine::Postgres, &load, Some(&pg));

    let ceiling = serve_ceiling();
    let http = client();
    let target = [Target { url: format!("{}/ping", ceiling.url), auth: None }];
    let ok = reqwest::StatusCode::OK;
    load.block_on(closed_loop(&http, &target, ok, WARM_UP));
    let ceiling_open = load.block_on(open_loop(&http, &target, ok));
    print(&format!("ceiling: open loop {RATE} req/s"), &ceiling_open);
    let ceiling_closed = load.block_on(closed_loop(&http, &target, ok, CLOSED_LOOP));
    print(&format!("ceiling: closed loop, {CONNECTIONS} conns"), &ceiling_closed);
    drop(ceiling);

    for (name, f) in [("sqlite", &sqlite_open), ("postgres", &pg_open)] {
        let verdict = if f.p99 <= 5.0 && f.p50 <= 1.0 && f.failed == 0 { "meets" } else { "MISSES" };
        println!("{name}: {verdict} the target (P50 ≤ 1 ms, P99 ≤ 5 ms at {RATE} req/s, no failures)");
    }
    println!(
        "update_check: sqlite_p99_ms={:.3} postgres_p99_ms={:.3} max_rps={:.0} ceiling_rps={:.0}",
        sqlite_open.p99,
        pg_open.p99,
        sqlite_closed.rps.min(pg_closed.rps),
        ceiling_closed.rps
    );
}
