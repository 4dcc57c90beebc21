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

/// deploy/ must not drift from the binary: the example config loads, every environment
/// variable the compose file, the Helm chart and the Dockerfile hand the coordinator is one its
/// `--help` lists, and every `.Values` path the chart's templates read exists in values.yaml.
#[test]
fn deploy_files_use_only_settings_the_coordinator_knows() {
    let deploy = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
    let read = |p: &str| std::fs::read_to_string(deploy.join(p)).unwrap_or_else(|e| panic!("{p}: {e}"));

    let config = flotilla_coordinator::config::Config::load(&deploy.join("coordinator.toml")).expect("example loads");
    assert_eq!(config.stages.len(), 3);
    assert!(
        matches!(config.storage, flotilla_coordinator::config::StorageConfig::S3(ref s3) if s3.bucket == "flotilla")
    );

    let help = Command::new(env!("CARGO_BIN_EXE_flotilla-coordinator")).arg("--help").output().expect("--help");
    let help = String::from_utf8_lossy(&help.stdout).into_owned();
    let known: std::collections::HashSet<&str> =
        help.split("[env: ").skip(1).filter_map(|rest| rest.split(['=', ']']).next()).collect();
    assert!(known.contains("DATABASE_URL") && known.contains("FLOTILLA_TLS_CERT"), "{known:?}");

    let is_env =
        |w: &str| !w.is_empty() && w.bytes().all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_');
    let mut used: Vec<(String, &str)> = Vec::new();
    // compose.yaml: the coordinator's environment block (the x-coordinator anchor).
    let compose = read("compose.yaml");
    let block = compose.split("x-coordinator:").nth(1).and_then(|b| b.split("\nservices:").next()).expect("anchor");
    let env = block.split("environment:").nth(1).and_then(|b| b.split("  secrets:").next()).expect("environment");
    for line in env.lines() {
        if let Some((k, _)) = line.trim().split_once(':')
            && is_env(k)
        {
            used.push((k.to_owned(), "compose.yaml"));
        }
    }
    // The chart's container env.
    for line in read("helm/flotilla/templates/deployment.yaml").lines() {
        if let Some(k) = line.trim().strip_prefix("- name: ")
            && is_env(k)
        {
            used.push((k.to_owned(), "deployment.yaml"));
        }
    }
    // The image's defaults.
    let dockerfile = read("Dockerfile");
    for k in dockerfile
        .split_whitespace()
        .filter_map(|w| w.split_once('=').map(|(k, _)| k))
        .filter(|k| k.starts_with("FLOTILLA_"))
    {
        used.push((k.to_owned(), "Dockerfile"));
    }
    assert!(used.len() > 20, "found the settings: {used:?}");
    for (k, file) in &used {
        assert!(known.contains(k.as_str()), "{file} sets {k}, which flotilla-coordinator --help does not list");
    }

    // Chart values: every `.Values.a.b` a template reads is declared in values.yaml.
    let values = read("helm/flotilla/values.yaml");
    let templates = std::fs::read_dir(deploy.join("helm/flotilla/templates")).expect("templates");
    for t in templates {
        let text = std::fs::read_to_string(t.expect("entry").path()).expect("template");
        for path in text.split(".Values.").skip(1) {
            let path: String = path.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '.').collect();
            let mut indent = String::new();
            for part in path.split('.').filter(|p| !p.is_empty()) {
                let key = format!("\n{indent}{part}:");
                assert!(values.contains(&key) || values.starts_with(&key[1..]), "values.yaml lacks {path} ({part})");
                indent.push_str("  ");
            }
        }
    }
}
