//! An offline site in network namespaces: the release reaches it on a USB stick (an export
//! with a signed rollout directive) imported into a site cache, while no coordinator process
//! runs anywhere and the origin host answers nothing. Agents hear the cache's offer over
//! mDNS-discovered peers, apply the directive's cohort themselves, install from peers only,
//! and queue their events; when the coordinator comes back on its address, the events reach
//! it, each once. Needs root (CI runs as root); fails loudly without it.

use std::process::Command;
use std::time::Duration;

use flotilla_core::rollout::{RolloutSalt, in_rollout};

use crate::netns::{Daemons, Net};
use crate::support::*;

/// The directive's salt, fixed so the test can pick devices on both sides of the cohort.
const SALT: &str = "0f1e2d3c4b5a69788796a5b4c3d2e1f0";
/// The directive's share of devices.
const PERCENT: u16 = 50;
/// Liveness bound of each wait (not a timing assertion).
const LIMIT: Duration = Duration::from_secs(240);

/// `n` device ids in the directive's cohort and `m` outside it.
fn devices(n: usize, m: usize) -> (Vec<String>, Vec<String>) {
    let salt: RolloutSalt = SALT.parse().expect("salt");
    let ids = (0..).map(|i| format!("site-dev-{i}"));
    let (mut inside, mut outside) = (Vec::new(), Vec::new());
    for id in ids {
        if in_rollout(&salt, &id, PERCENT * 100) {
            if inside.len() < n {
                inside.push(id);
            }
        } else if outside.len() < m {
            outside.push(id);
        }
        if inside.len() == n && outside.len() == m {
            return (inside, outside);
        }
    }
    unreachable!("the id sequence is endless")
}

#[test]
fn an_offline_site_installs_an_imported_release_under_its_signed_directive_and_reports_later() {
    let mut net = Net::new();
    let origin = net.host(1);
    let listen = format!("{}.1:7070", net.subnet);
    let coord = Coordinator::start_in(Some(&origin), &listen);
    let publisher = Publisher::new(&coord);
    let img = image(41, 3 << 20);
    std::fs::write(publisher.path("v1.img"), &img).unwrap();
    let id = publisher.release("1.0.0", &publisher.path("v1.img"));
    let export = publisher.path("export");
    let key = coord.rollout_key();
    let percent = PERCENT.to_string();
    let args = [
        "--directive-key".as_ref(),
        key.as_os_str(),
        "--percent".as_ref(),
        percent.as_ref(),
        "--salt".as_ref(),
        SALT.as_ref(),
    ];
    publisher.export_with(id, &export, &args);
    assert!(export.join("directive.json").exists(), "the export carries the directive");
    let url = coord.url.clone();
    // From here on no coordinator process runs: the origin host exists but answers nothing.
    let data = coord.stop();

    // The USB stick goes into the site cache: import, then serve.
    let root = publisher.path("root.json");
    let store = tempfile::tempdir().unwrap();
    let out = run_ok(
        Command::new(mesh_bin())
            .arg("import")
            .arg("--store")
            .arg(store.path())
            .arg("--trust-root")
            .arg(&root)
            .arg(&export)
            .env("RUST_LOG", "warn"),
    );
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("offered to 50% of devices"), "{said}");
    let cache_host = net.host(2);
    let cache = SiteCache::start_with(
        Some(&cache_host),
        store,
        &root,
        &["--listen", "/ip4/0.0.0.0/tcp/0", "--announce-every", "1s"].map(std::ffi::OsStr::new),
        None,
    );

    let (inside, outside) = devices(3, 1);
    let mesh = "enabled = true\nmdns = true\nlisten = [\"/ip4/0.0.0.0/tcp/0\"]\ndeadline = \"30s\"\n";
    let agents: Vec<Agent> = inside.iter().chain(&outside).map(|d| Agent::with_url(&url, &root, d, mesh)).collect();
    let hosts: Vec<String> = (0..agents.len()).map(|i| net.host(10 + i as u8)).collect();
    let _daemons = Daemons(agents.iter().zip(&hosts).map(|(a, ns)| a.spawn_run(Some(ns))).collect());
    let (members, other) = agents.split_at(inside.len());

    for (i, agent) in members.iter().enumerate() {
        let status = wait_for(&format!("device {} to stage the offered release", inside[i]), LIMIT, || {
            let s = agent.status();
            // Staged and switched, with its events queued (`applied` is queued just after the
            // journal records the switch, so a status read in between shows one less).
            let queued = s["pending_events"].as_u64().unwrap_or(0) >= 3;
            (s["state"] == "staged" && s["target"]["activated"] == true && queued).then_some(s)
        });
        assert_eq!(agent.slot("b"), img, "device {} holds the exported image\n{}", inside[i], agent.log());
        let bytes = &status["target"]["bytes"];
        assert_eq!(bytes["peer"].as_u64(), Some(img.len() as u64), "every byte came from peers: {status}");
        assert_eq!(bytes["cdn"].as_u64(), Some(0), "{status}");
    }
    // The device outside the cohort heard the same verified offer and declined it.
    let outsider = &other[0];
    wait_for("the device outside the cohort to decline the offer", LIMIT, || {
        outsider.log().contains("this device is not in the rollout").then_some(())
    });
    let status = outsider.status();
    assert_ne!(status["state"], "staged", "{status}");
    assert!(status["target"].is_null(), "{status}");
    assert!(outsider.slot("b").is_empty(), "nothing was written to the outsider's slot");
    assert!(cache.stat("offers_sent").is_some_and(|n| n > 0));

    // The coordinator comes back on its address: the queued events reach it, each once.
    let coord = Coordinator::start_with_data(Some(&origin), &listen, data);
    assert_eq!(coord.url, url);
    for (i, agent) in members.iter().enumerate() {
        wait_for(&format!("device {} to deliver its events", inside[i]), LIMIT, || {
            (agent.status()["pending_events"] == 0).then_some(())
        });
    }
    let stats = release_stats(&coord, id);
    for kind in ["downloading", "staged", "applied"] {
        let k = &stats["events"][kind];
        assert_eq!(k["devices"].as_u64(), Some(3), "{kind}: {stats}");
        assert_eq!(k["events"].as_u64(), Some(3), "{kind} events arrived exactly once per device: {stats}");
    }
    assert!(stats["events"]["failed"].is_null(), "{stats}");
}

/// `GET /v1/releases/{id}/stats` as the admin (plain HTTP/1.1: the answer has a length).
fn release_stats(coord: &Coordinator, id: i64) -> serde_json::Value {
    use std::io::{Read as _, Write as _};
    let host = coord.url.trim_start_matches("http://");
    let mut conn = std::net::TcpStream::connect(host).expect("connect to the coordinator");
    write!(
        conn,
        "GET /v1/releases/{id}/stats HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {ADMIN}\r\nConnection: close\r\n\r\n"
    )
    .expect("send");
    let mut answer = String::new();
    conn.read_to_string(&mut answer).expect("read");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let body = answer.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or_default();
    serde_json::from_str(body).unwrap_or_else(|e| panic!("stats JSON: {e}: {body}"))
}
