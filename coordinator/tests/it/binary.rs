//! The real binary with zero configuration: SQLite and files under ./flotilla-data.

use std::io::{BufRead as _, BufReader};
use std::process::{Command, Stdio};

#[test]
fn zero_config_binary_starts_serves_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().expect("tmp");
    let mut child = Command::new(env!("CARGO_BIN_EXE_flotilla-coordinator"))
        .current_dir(dir.path())
        .env_remove("DATABASE_URL")
        .env("PORT", "0")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut line).expect("read");
    let url = line.trim().strip_prefix("listening on ").expect("listening line").to_owned();
    let body = std::process::Command::new("curl").args(["-sf", &format!("{url}/healthz")]).output();
    // curl may be absent on a minimal machine; fall back to a raw request.
    let ok = match body {
        Ok(out) if out.status.success() => String::from_utf8_lossy(&out.stdout).into_owned(),
        _ => raw_get(&url, "/healthz"),
    };
    assert!(ok.contains("ok"), "{ok}");
    for f in ["flotilla.db", "admin-token", "rollout-key.pem", "objects"] {
        assert!(dir.path().join("flotilla-data").join(f).exists(), "{f} created on first start");
    }
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(dir.path().join("flotilla-data/admin-token")).expect("meta").permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
    let status = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().expect("kill");
    assert!(status.success());
    let exit = child.wait().expect("wait");
    assert!(exit.success(), "graceful shutdown exits 0, got {exit}");
}

fn raw_get(url: &str, path: &str) -> String {
    use std::io::{Read as _, Write as _};
    let addr = url.trim_start_matches("http://");
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read");
    out
}
