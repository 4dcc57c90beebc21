//! `cargo bench -p flotilla-publisher --bench publish`: publishes a 1 GiB image
//! (`FLOTILLA_BENCH_MB` to change) with the real `flotilla` CLI to a real local coordinator
//! (SQLite, filesystem store, release build), then a second version with a small change, and
//! prints what a full re-upload (what Mender/hawkBit artifacts, or `curl -T`, would send) and
//! `sha256sum` (the floor of reading the image once) cost on the same file next to it.
//!
//! Last line: `publish: first_s=<n> second_s=<n> second_uploaded_bytes=<n> changed_bytes=<n>`.

use std::io::{BufRead as _, BufReader, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

fn main() {
    if let Err(e) = run() {
        eprintln!("publish bench: {e}");
        std::process::exit(1);
    }
}

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

fn run() -> Result<()> {
    let mb: u64 = std::env::var("FLOTILLA_BENCH_MB").ok().and_then(|v| v.parse().ok()).unwrap_or(1024);
    let size = mb << 20;
    let coordinator = coordinator_bin()?;
    let work = tempfile::tempdir()?;
    let data = work.path().join("data");
    std::fs::create_dir_all(&data)?;
    let mut server = Command::new(&coordinator)
        .env("FLOTILLA_DATA_DIR", &data)
        .env("FLOTILLA_LISTEN", "127.0.0.1:0")
        .env("RUST_LOG", "warn")
        .env_remove("DATABASE_URL")
        .env_remove("S3_BUCKET")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let mut line = String::new();
    BufReader::new(server.stdout.take().ok_or("no stdout")?).read_line(&mut line)?;
    let url = line.trim().strip_prefix("listening on ").ok_or("coordinator did not start")?.to_owned();
    let admin = std::fs::read_to_string(data.join("admin-token"))?.trim().to_owned();
    let result = bench(work.path(), &url, &admin, size);
    let _ = server.kill();
    let _ = server.wait();
    result
}

fn bench(work: &Path, url: &str, admin: &str, size: u64) -> Result<()> {
    let cli = |args: &[&str]| -> Result<serde_json::Value> {
        let out = Command::new(env!("CARGO_BIN_EXE_flotilla"))
            .env("FLOTILLA_CONFIG_DIR", work.join("config"))
            .env("FLOTILLA_URL", url)
            .env("FLOTILLA_TOKEN", admin)
            .arg("--json")
            .args(args)
            .stderr(Stdio::inherit())
            .output()?;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        if !out.status.success() {
            return Err(format!("flotilla {args:?}: {v}").into());
        }
        Ok(v)
    };
    let p = |name: &str| work.join(name).to_str().map(str::to_owned).ok_or("non-UTF-8 temp path");
    let (key, root) = (p("release.pem")?, p("root.json")?);
    cli(&["keys", "generate", "--out", &key])?;
    cli(&["root", "init", "--root-key", &key, "--release-key", &key, "--out", &root])?;
    cli(&["product", "create", "bench", "--trust-root", &root, "--enrollment-secret", "bench-enrollment-secret"])?;

    eprintln!("writing a {} MiB image", size >> 20);
    let v1 = work.join("v1.img");
    write_image(&v1, size)?;
    // v2: 1 MiB rewritten in three places (a kernel, a config, a log region), 3 MiB in all.
    let v2 = work.join("v2.img");
    std::fs::copy(&v1, &v2)?;
    let changed = patch(&v2, size)?;

    let t = Instant::now();
    let r1 = cli(&["release", "--product", "bench", "--image", &p("v1.img")?, "--version", "1.0.0", "--key", &key])?;
    let first_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let r2 = cli(&["release", "--product", "bench", "--image", &p("v2.img")?, "--version", "1.0.1", "--key", &key])?;
    let second_s = t.elapsed().as_secs_f64();

    let t = Instant::now();
    let status = Command::new("sha256sum").arg(&v2).stdout(Stdio::null()).status()?;
    let sha_s = t.elapsed().as_secs_f64();
    if !status.success() {
        return Err("sha256sum failed".into());
    }
    let mb = size as f64 / 1_048_576.0;
    let uploaded2 = r2["uploaded_bytes"].as_u64().ok_or("no uploaded_bytes")?;
    println!(
        "first:  {first_s:8.2} s  {:7.1} MiB/s  chunks={} uploaded_bytes={}",
        mb / first_s,
        r1["chunks"],
        r1["uploaded_bytes"]
    );
    println!(
        "second: {second_s:8.2} s  {:7.1} MiB/s  uploaded_chunks={} uploaded_bytes={uploaded2} ({:.2} % of a full upload)",
        mb / second_s,
        r2["uploaded_chunks"],
        100.0 * uploaded2 as f64 / size as f64
    );
    println!("full re-upload (Mender/hawkBit artifact, curl -T): uploaded_bytes={size}");
    println!("sha256sum of the image (read floor): {sha_s:.2} s {:.1} MiB/s", mb / sha_s);
    println!(
        "publish: first_s={first_s:.2} second_s={second_s:.2} second_uploaded_bytes={uploaded2} changed_bytes={changed}"
    );
    Ok(())
}

/// A deterministic image: pseudo-random blocks with some repetition (like real file systems).
fn write_image(path: &Path, size: u64) -> Result<()> {
    let mut f = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(path)?);
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut block = vec![0u8; 1 << 20];
    let mut written = 0;
    while written < size {
        for w in block.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            w.copy_from_slice(&x.to_le_bytes());
        }
        // One block in eight compresses well (text-like runs).
        if (written >> 20) % 8 == 0 {
            for (i, b) in block.iter_mut().enumerate() {
                *b = b"flotilla config line\n"[i % 21];
            }
        }
        let n = block.len().min(usize::try_from(size - written)?);
        f.write_all(&block[..n])?;
        written += n as u64;
    }
    f.flush()?;
    Ok(())
}

/// Rewrites 1 MiB at three offsets; returns the bytes changed.
fn patch(path: &Path, size: u64) -> Result<u64> {
    use std::os::unix::fs::FileExt as _;
    let f = std::fs::OpenOptions::new().write(true).open(path)?;
    let len = (1u64 << 20).min(size / 4);
    // Fresh random bytes at each place (a repeating pattern would dedupe into a few chunks).
    let mut x: u64 = 0xD1B5_4A32_D192_ED03;
    for at in [size / 10, size / 2, size - len] {
        let mut buf = Vec::with_capacity(usize::try_from(len)? + 8);
        while (buf.len() as u64) < len {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            buf.extend_from_slice(&x.to_le_bytes());
        }
        buf.truncate(usize::try_from(len)?);
        f.write_all_at(&buf, at)?;
    }
    f.sync_all()?;
    Ok(3 * len)
}

/// The release coordinator binary, brought up to date by a nested cargo build.
fn coordinator_bin() -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let profile = exe.parent().and_then(Path::parent).ok_or("unexpected bench path")?.to_path_buf();
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.args(["build", "--quiet", "--locked", "-p", "flotilla-coordinator", "--bin", "flotilla-coordinator"])
        .current_dir(env!("CARGO_MANIFEST_DIR"));
    if profile.file_name().is_some_and(|n| n == "release") {
        cmd.arg("--release");
    }
    if let Some(target) = profile.parent() {
        cmd.env("CARGO_TARGET_DIR", target);
    }
    if !cmd.status()?.success() {
        return Err("building flotilla-coordinator failed".into());
    }
    Ok(profile.join("flotilla-coordinator"))
}
