//! Bad input gets a clear error, the right exit code, and nothing half-done.

use std::io::Read as _;
use std::process::Stdio;

use flotilla_core::chunking::{ChunkParams, Chunker};
use serde_json::json;

use crate::support::{Coordinator, Engine, Flotilla, both_engines, http_json, image, write};

/// Exit codes (publisher/src/error.rs).
const USAGE: i32 = 2;
const AUTH: i32 = 3;
const CONFLICT: i32 = 4;
const REJECTED: i32 = 6;
const VERIFY: i32 = 7;

#[test]
fn missing_file_wrong_key_and_conflicts() {
    let coord = Coordinator::start(Engine::Sqlite);
    let cli = Flotilla::new(&coord);
    let (key, _) = cli.setup_product("edge");
    let rel = |args: &[&str]| {
        let mut v = vec!["release", "--product", "edge", "--key", &key];
        v.extend_from_slice(args);
        v.into_iter().map(str::to_owned).collect::<Vec<_>>()
    };
    let run_fails = |args: Vec<String>, code: i32| {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        cli.fails(&a, code)
    };

    let msg = run_fails(rel(&["--image", "/nonexistent/os.img", "--version", "1.0.0"]), USAGE);
    assert!(msg.contains("/nonexistent/os.img") && msg.contains("no such"), "{msg}");
    let msg = run_fails(rel(&["--version", "1.0.0"]), USAGE);
    assert!(msg.contains("--image") && msg.contains("--dir"), "says what to pass: {msg}");
    let msg = run_fails(rel(&["--image", "x", "--version", "not-a-version"]), USAGE);
    assert!(msg.to_lowercase().contains("version"), "{msg}");

    // A key that is not in the product's trust root is refused before anything is uploaded.
    let stranger = cli.path("stranger.pem");
    cli.ok(&["keys", "generate", "--out", stranger.to_str().expect("utf-8")]);
    let img = write(&cli.path("a.img"), &image(7, 1 << 20));
    let msg = cli.fails(
        &[
            "release",
            "--product",
            "edge",
            "--key",
            stranger.to_str().expect("utf-8"),
            "--image",
            &img,
            "--version",
            "1.0.0",
        ],
        REJECTED,
    );
    assert!(msg.contains("not a release key"), "{msg}");
    let ids = chunk_ids(&image(7, 1 << 20));
    assert_eq!(coord.missing(&ids), ids.len(), "nothing was uploaded with the wrong key");
    let msg = run_fails(rel(&["--image", &img, "--version", "1.0.0", "--key", "/nonexistent.pem"]), USAGE);
    assert!(msg.contains("flotilla keys generate"), "says how to get a key: {msg}");

    // The same version twice is the server's 409, as a clear message and exit code.
    cli.ok(&rel(&["--image", &img, "--version", "1.0.0"]).iter().map(String::as_str).collect::<Vec<_>>());
    let img2 = write(&cli.path("b.img"), &image(8, 1 << 20));
    let msg = run_fails(rel(&["--image", &img2, "--version", "1.0.0"]), CONFLICT);
    assert!(msg.contains("already published") && msg.contains("--version"), "{msg}");
    // A version_code that is not greater than the channel's latest.
    let msg = run_fails(rel(&["--image", &img2, "--version", "1.0.1", "--version-code", "1"]), CONFLICT);
    assert!(msg.contains("version_code"), "{msg}");
    let list = cli.ok(&["releases", "list", "--product", "edge"]);
    assert_eq!(list["releases"].as_array().map(Vec::len), Some(1), "refused releases leave nothing: {list}");
}

#[test]
fn expired_and_missing_tokens_are_auth_errors() {
    let coord = Coordinator::start(Engine::Sqlite);
    let mut cli = Flotilla::new(&coord);
    cli.setup_product("auth");
    let token = http_json(
        "POST",
        &format!("{}/v1/tokens", coord.url),
        &coord.admin,
        Some(json!({ "scope": "publish", "product": "auth", "label": "ci", "expires_in": 0 })),
    );
    cli.token = Some(token["token"].as_str().expect("token").to_owned());
    let msg = cli.fails(&["releases", "list", "--product", "auth"], AUTH);
    assert!(msg.contains("flotilla login"), "says how to fix it: {msg}");
    cli.token = Some("flt_not-a-real-token".into());
    cli.fails(&["product", "list"], AUTH);
    cli.token = None;
    cli.fails(&["product", "list"], AUTH);
}

both_engines!(interrupted_upload_resumes, interrupted_upload_resumes);

/// kill -9 the CLI mid-upload; the re-run sends exactly the chunks that did not arrive.
fn interrupted_upload_resumes(engine: Engine) {
    let coord = Coordinator::start(engine);
    let cli = Flotilla::new(&coord);
    let (key, _) = cli.setup_product("ship");
    let bytes = image(11, 6 << 20);
    let img = write(&cli.path("os.img"), &bytes);
    let ids = chunk_ids(&bytes);
    let mut unique = ids.clone();
    unique.sort();
    unique.dedup();
    assert!(unique.len() > 20, "enough chunks to cut the upload in the middle");
    let stall_after = unique.len() / 3;

    let mut child = cli
        .command()
        .env("FLOTILLA_TEST_STALL_AFTER_UPLOADS", stall_after.to_string())
        .args(["--json", "release", "--product", "ship", "--image", &img, "--version", "3.0.0", "--key", &key])
        .args(["--parallel", "1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    // Wait (on the coordinator's own view) until exactly `stall_after` chunks have arrived.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    loop {
        let missing = coord.missing(&unique);
        if missing == unique.len() - stall_after {
            break;
        }
        assert!(missing > unique.len() - stall_after, "the CLI sent more than it was allowed to");
        assert!(child.try_wait().expect("wait").is_none(), "the CLI ended early");
        assert!(std::time::Instant::now() < deadline, "upload did not progress");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.kill().expect("kill -9");
    let status = child.wait().expect("wait");
    assert!(!status.success());
    let mut out = String::new();
    child.stdout.take().expect("stdout").read_to_string(&mut out).expect("read");
    assert!(out.trim().is_empty(), "a killed CLI published nothing: {out}");
    let list = cli.ok(&["releases", "list", "--product", "ship"]);
    assert_eq!(list["releases"].as_array().map(Vec::len), Some(0), "no release without all chunks");

    let r = cli.ok(&["release", "--product", "ship", "--image", &img, "--version", "3.0.0", "--key", &key]);
    assert_eq!(r["uploaded_chunks"], unique.len() - stall_after, "only the missing chunks are sent: {r}");
    assert_eq!(r["reused_chunks"].as_u64(), Some(ids.len() as u64 - (unique.len() - stall_after) as u64), "{r}");
    assert_eq!(coord.missing(&unique), 0);
}

#[test]
fn tampered_export_is_refused() {
    let coord = Coordinator::start(Engine::Sqlite);
    let cli = Flotilla::new(&coord);
    let (key, root) = cli.setup_product("site");
    let img = write(&cli.path("os.img"), &image(21, 2 << 20));
    let r = cli.ok(&["release", "--product", "site", "--image", &img, "--version", "1.0.0", "--key", &key]);
    let id = r["id"].as_i64().expect("id").to_string();
    let fresh = |name: &str| {
        let out = cli.path(name);
        cli.ok(&["export", &id, out.to_str().expect("utf-8")]);
        out
    };

    // One flipped byte inside a chunk object.
    let out = fresh("chunk");
    let chunk = first_chunk(&out);
    let mut obj = std::fs::read(&chunk).expect("read");
    let last = obj.len() - 1;
    obj[last] ^= 0x40;
    std::fs::write(&chunk, obj).expect("write");
    let msg = cli.fails(&["verify", out.to_str().expect("utf-8"), "--trust-root", &root], VERIFY);
    assert!(msg.contains("chunk"), "{msg}");

    // A missing chunk.
    let out = fresh("gone");
    std::fs::remove_file(first_chunk(&out)).expect("rm");
    cli.fails(&["verify", out.to_str().expect("utf-8"), "--trust-root", &root], VERIFY);

    // A manifest edited after signing (bigger version_code).
    let out = fresh("manifest");
    let m = out.join("manifest.json");
    let text = std::fs::read_to_string(&m).expect("read");
    let env: serde_json::Value = serde_json::from_str(&text).expect("json");
    let payload = base64_decode(env["payload"].as_str().expect("payload"));
    let mut body: serde_json::Value = serde_json::from_slice(&payload).expect("manifest json");
    assert_eq!(body["version_code"], 1);
    body["version_code"] = 9.into();
    let mut env2 = env.clone();
    env2["payload"] = base64_encode(body.to_string().as_bytes()).into();
    std::fs::write(&m, env2.to_string()).expect("write");
    let msg = cli.fails(&["verify", out.to_str().expect("utf-8"), "--trust-root", &root], VERIFY);
    assert!(msg.contains("manifest"), "{msg}");

    // An export checked against a different trust root (an attacker's export).
    let out = fresh("foreign");
    let other = Flotilla::new(&coord);
    let other_root = other.path("root.json");
    let rk = other.path("r.pem");
    let s = |p: &std::path::Path| p.to_str().expect("utf-8").to_owned();
    other.ok(&["keys", "generate", "--out", &s(&rk)]);
    other.ok(&["root", "init", "--root-key", &s(&rk), "--release-key", &s(&rk), "--out", &s(&other_root)]);
    cli.fails(&["verify", &s(&out), "--trust-root", &s(&other_root)], VERIFY);

    // A truncated index.
    let out = fresh("index");
    let idx = out.join("index.bin");
    let bytes = std::fs::read(&idx).expect("read");
    std::fs::write(&idx, &bytes[..bytes.len() / 2]).expect("write");
    let msg = cli.fails(&["verify", &s(&out), "--trust-root", &root], VERIFY);
    assert!(msg.contains("index"), "{msg}");

    // Exporting into a non-empty directory is refused without touching it.
    let msg = cli.fails(&["export", &id, &s(&out)], USAGE);
    assert!(msg.contains("not empty"), "{msg}");
}

fn chunk_ids(bytes: &[u8]) -> Vec<String> {
    let chunked = Chunker::new(ChunkParams::IMAGE).chunk_reader(bytes).expect("chunk");
    chunked.index.entries().iter().map(|e| e.id.to_hex()).collect()
}

fn first_chunk(export: &std::path::Path) -> std::path::PathBuf {
    let mut dirs: Vec<_> =
        std::fs::read_dir(export.join("chunks")).expect("chunks").map(|e| e.expect("entry").path()).collect();
    dirs.sort();
    let mut files: Vec<_> = std::fs::read_dir(&dirs[0]).expect("dir").map(|e| e.expect("entry").path()).collect();
    files.sort();
    files.remove(0)
}

fn base64_decode(s: &str) -> Vec<u8> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.decode(s).expect("base64")
}

fn base64_encode(b: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(b)
}
