//! On loopback, with static bootstrap peers: a site cache serving an imported export to
//! three agents, a malicious cache, an agent on its own, a fleet-private network, QUIC, and a
//! holder found through Kademlia.

use std::time::Duration;

use crate::support::*;

/// Liveness bound of one install (not a timing assertion).
const INSTALL_LIMIT: Duration = Duration::from_secs(180);

/// A coordinator with one published 100 % release of `len` bytes, exported to a directory.
struct Site {
    coord: Coordinator,
    publisher: Publisher,
    image: Vec<u8>,
    export: std::path::PathBuf,
}

fn site(seed: u64, len: usize) -> Site {
    let coord = Coordinator::start();
    let publisher = Publisher::new(&coord);
    let image = image(seed, len);
    std::fs::write(publisher.path("v1.img"), &image).unwrap();
    let id = publisher.release("1.0.0", &publisher.path("v1.img"));
    let export = publisher.path("export");
    publisher.export(id, &export);
    Site { coord, publisher, image, export }
}

fn bytes(report: &serde_json::Value, source: &str) -> u64 {
    report["bytes"][source].as_u64().unwrap_or_else(|| panic!("bytes.{source} in {report}"))
}

#[test]
fn three_agents_install_from_a_site_cache_and_the_origin_serves_little() {
    let s = site(21, 6 << 20);
    let root = s.publisher.path("root.json");
    let cache = SiteCache::start(&root, &s.export, None);
    let origin_before = s.coord.bytes_served();

    let agents: Vec<Agent> = (0..3)
        .map(|i| Agent::new(&s.coord, &root, &format!("dev-{i}"), std::slice::from_ref(&cache.addr), "1h"))
        .collect();
    let children: Vec<_> = agents.iter().map(Agent::spawn_check).collect();
    for (agent, child) in agents.iter().zip(children) {
        let (report, log) = finish(child, INSTALL_LIMIT);
        assert_eq!(report["outcome"], "staged", "{report}\n{log}");
        assert_eq!(agent.slot("b"), s.image, "the slot holds the published image");
        assert_eq!(bytes(&report, "peer"), s.image.len() as u64, "every byte came from the cache: {report}\n{log}");
        assert_eq!(bytes(&report, "cdn"), 0, "{report}");
    }
    let origin = s.coord.bytes_served() - origin_before;
    // Only the three indexes came from the origin.
    assert!(origin < s.image.len() as u64 / 10, "the origin served {origin} B for 3 × {} B", s.image.len());
    let served = wait_for("the cache's counters", Duration::from_secs(10), || {
        cache.stat("served_bytes").filter(|b| *b > 0).and(cache.stat("served_chunks"))
    });
    assert!(served > 0);
}

#[test]
fn peers_serving_corrupted_or_wrong_chunks_are_banned_and_every_agent_installs_the_right_bytes() {
    let s = site(22, 3 << 20);
    let root = s.publisher.path("root.json");
    let flip = SiteCache::start(&root, &s.export, Some("flip"));
    let wrong = SiteCache::start(&root, &s.export, Some("wrong"));
    let good = SiteCache::start(&root, &s.export, None);

    let peers = [flip.addr.clone(), wrong.addr.clone(), good.addr.clone()];
    let agents: Vec<Agent> = (0..3).map(|i| Agent::new(&s.coord, &root, &format!("dev-{i}"), &peers, "1h")).collect();
    let children: Vec<_> = agents.iter().map(Agent::spawn_check).collect();
    for (agent, child) in agents.iter().zip(children) {
        let (report, log) = finish(child, INSTALL_LIMIT);
        assert_eq!(report["outcome"], "staged", "{report}\n{log}");
        assert_eq!(agent.slot("b"), s.image, "the slot holds the published image, not the corrupted chunks");
        assert!(log.contains("peer sent a bad chunk") && log.contains("peer banned"), "no ban logged:\n{log}");
        assert_eq!(bytes(&report, "peer") + bytes(&report, "cdn"), s.image.len() as u64, "{report}");
    }
    // Each agent banned a lying cache at its first bad chunk: beyond that, only the requests
    // already in flight to it (at most 3 per agent, each a run of chunks) were answered.
    let limit = 3 * flotilla_mesh::MAX_IN_FLIGHT_PER_PEER as u64;
    for (what, bad) in [("flipping", &flip), ("wrong-chunk", &wrong)] {
        let tried = wait_for(&format!("the {what} cache to serve"), Duration::from_secs(10), || {
            bad.stat("served_requests").filter(|n| *n > 0)
        });
        assert!((1..=limit).contains(&tried), "the {what} cache answered {tried} requests from 3 agents");
    }
}

#[test]
fn an_agent_without_peers_falls_back_to_the_cdn() {
    let s = site(23, 2 << 20);
    let root = s.publisher.path("root.json");
    // A bootstrap peer that is not there. The deadline is long: a device alone is its own
    // origin fetcher for every chunk and must not wait for it (the install's liveness bound
    // is far shorter than the deadline).
    let nobody = "/ip4/127.0.0.1/tcp/9/p2p/12D3KooWRrxVnnhY4QnXuqXbqm2bnVRs6ijTbKvZVfn3bRiBYHhr".to_owned();
    let agent = Agent::new(&s.coord, &root, "alone", &[nobody], "1h");
    let (report, log) = finish(agent.spawn_check(), INSTALL_LIMIT);
    assert_eq!(report["outcome"], "staged", "{report}\n{log}");
    assert_eq!(agent.slot("b"), s.image);
    assert_eq!(bytes(&report, "peer"), 0, "{report}");
    assert_eq!(bytes(&report, "cdn"), s.image.len() as u64, "{report}");
}

/// A free loopback TCP port (released again; the agent binds it right after).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A daemon agent that installs the release alone from the CDN, then stays up serving it
/// on `127.0.0.1:<port>`; returns it, its process and its address.
fn seeded_daemon(s: &Site, id: &str) -> (Agent, std::process::Child, String) {
    seeded_daemon_with(s, id, "")
}

/// [`seeded_daemon`] with `extra` lines in its `[mesh]` section.
fn seeded_daemon_with(s: &Site, id: &str, extra: &str) -> (Agent, std::process::Child, String) {
    let root = s.publisher.path("root.json");
    let port = free_port();
    let mesh =
        format!("enabled = true\nmdns = false\nlisten = [\"/ip4/127.0.0.1/tcp/{port}\"]\ndeadline = \"1h\"\n{extra}");
    let agent = Agent::with_mesh(&s.coord, &root, id, &mesh);
    let child = agent.spawn_run(None);
    wait_for("the seed to stage the release", INSTALL_LIMIT, || (agent.status()["state"] == "staged").then_some(()));
    assert_eq!(agent.slot("b"), s.image);
    let peer_id = wait_for("the seed's peer id in its log", Duration::from_secs(10), || {
        let log = agent.log();
        let at = log.find("peer_id=")? + "peer_id=".len();
        Some(log[at..].split_whitespace().next()?.to_owned())
    });
    (agent, child, format!("/ip4/127.0.0.1/tcp/{port}/p2p/{peer_id}"))
}

#[test]
fn a_device_that_installed_a_release_serves_it_to_a_late_comer() {
    let s = site(24, 3 << 20);
    let (_seed, mut seed_process, addr) = seeded_daemon(&s, "seed");
    let origin_before = s.coord.bytes_served();

    let late = Agent::new(&s.coord, &s.publisher.path("root.json"), "late", &[addr], "1h");
    let (report, log) = finish(late.spawn_check(), INSTALL_LIMIT);
    let _ = seed_process.kill();
    let _ = seed_process.wait();
    assert_eq!(report["outcome"], "staged", "{report}\n{log}");
    assert_eq!(late.slot("b"), s.image);
    assert_eq!(bytes(&report, "peer"), s.image.len() as u64, "{report}\n{log}");
    assert!(s.coord.bytes_served() - origin_before < s.image.len() as u64 / 10, "only the index came from the origin");
}

#[test]
fn a_peer_killed_mid_transfer_leaves_the_others_to_finish() {
    let s = site(25, 4 << 20);
    let (_seed, mut seed_process, addr) = seeded_daemon(&s, "seed");

    // The late-comer is slowed down so the seed can be killed while it downloads.
    let root = s.publisher.path("root.json");
    let late = Agent::new(&s.coord, &root, "late", &[addr], "1h");
    let config = late.dir.path().join("agent.toml");
    let text =
        std::fs::read_to_string(&config).unwrap().replace("[device_id]", "max_download_rate = 1000000\n[device_id]");
    std::fs::write(&config, text).unwrap();
    let child = late.spawn_check();
    let downloads = late.dir.path().join("state/downloads.log");
    wait_for("a few chunks from the seed", INSTALL_LIMIT, || {
        let n = std::fs::read_to_string(&downloads).unwrap_or_default().lines().filter(|l| l.contains("peer")).count();
        (n >= 3).then_some(())
    });
    let _ = seed_process.kill();
    let _ = seed_process.wait();

    let (report, log) = finish(child, INSTALL_LIMIT);
    assert_eq!(report["outcome"], "staged", "{report}\n{log}");
    assert_eq!(late.slot("b"), s.image, "the install finished with the right bytes");
    assert!(
        bytes(&report, "peer") > 0 && bytes(&report, "cdn") > 0,
        "some from the seed, the rest from the CDN: {report}"
    );
    assert_eq!(bytes(&report, "peer") + bytes(&report, "cdn"), s.image.len() as u64, "{report}");
}

#[test]
fn a_site_cache_serves_prometheus_metrics() {
    let s = site(23, 1 << 20);
    let root = s.publisher.path("root.json");
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let metrics = format!("127.0.0.1:{port}");
    let args = ["--listen", "/ip4/127.0.0.1/tcp/0", "--no-mdns", "--metrics", &metrics, "--import"];
    let mut args: Vec<&std::ffi::OsStr> = args.iter().map(std::ffi::OsStr::new).collect();
    args.push(s.export.as_os_str());
    let _cache = SiteCache::start_with(None, tempfile::tempdir().unwrap(), &root, &args, None);
    let chunks = std::fs::read_dir(s.export.join("chunks"))
        .unwrap()
        .map(|d| std::fs::read_dir(d.unwrap().path()).unwrap().count())
        .sum::<usize>();
    let text = wait_for("the metrics endpoint", Duration::from_secs(10), || {
        use std::io::{Read as _, Write as _};
        let mut conn = std::net::TcpStream::connect(&metrics).ok()?;
        conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").ok()?;
        let mut text = String::new();
        conn.read_to_string(&mut text).ok()?;
        Some(text)
    });
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    let value = |name: &str| text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse::<u64>().ok());
    assert_eq!(value("flotilla_mesh_store_chunks"), Some(chunks as u64), "{text}");
    assert_eq!(value("flotilla_mesh_served_chunks_total"), Some(0), "{text}");
}

/// Starts a site cache on loopback without mDNS with `args` (plus `--import export` when given).
fn cache_with(root: &std::path::Path, args: &[&str], export: Option<&std::path::Path>) -> SiteCache {
    let mut args: Vec<&std::ffi::OsStr> = args.iter().map(std::ffi::OsStr::new).collect();
    args.push("--no-mdns".as_ref());
    if let Some(e) = export {
        args.push("--import".as_ref());
        args.push(e.as_os_str());
    }
    SiteCache::start_with(None, tempfile::tempdir().unwrap(), root, &args, None)
}

#[test]
fn a_fleet_private_network_serves_only_devices_holding_its_key() {
    let s = site(26, 2 << 20);
    let root = s.publisher.path("root.json");
    let key = s.publisher.path("swarm.key");
    std::fs::write(&key, format!("/key/swarm/psk/1.0.0/\n/base16/\n{}\n", "5a".repeat(32))).unwrap();
    let key_arg = key.to_str().unwrap();
    let cache = cache_with(&root, &["--listen", "/ip4/127.0.0.1/tcp/0", "--psk-file", key_arg], Some(&s.export));

    let mesh = format!(
        "enabled = true\nmdns = false\nlisten = [\"/ip4/127.0.0.1/tcp/0\"]\nbootstrap = [\"{}\"]\ndeadline = \"1h\"\npsk_file = \"{}\"\n",
        cache.addr,
        key.display()
    );
    let member = Agent::with_mesh(&s.coord, &root, "member", &mesh);
    let (report, log) = finish(member.spawn_check(), INSTALL_LIMIT);
    assert_eq!(report["outcome"], "staged", "{report}\n{log}");
    assert_eq!(member.slot("b"), s.image);
    assert_eq!(bytes(&report, "peer"), s.image.len() as u64, "the member got every byte from the cache: {report}");

    // A device without the key cannot even connect: everything comes from the CDN.
    let outsider = Agent::new(&s.coord, &root, "outsider", std::slice::from_ref(&cache.addr), "1h");
    let (report, log) = finish(outsider.spawn_check(), INSTALL_LIMIT);
    assert_eq!(report["outcome"], "staged", "{report}\n{log}");
    assert_eq!(outsider.slot("b"), s.image);
    assert_eq!((bytes(&report, "peer"), bytes(&report, "cdn")), (0, s.image.len() as u64), "{report}");

    // A key file that is not one is refused when the config loads, naming the setting.
    std::fs::write(&key, "not a key").unwrap();
    let out = member.spawn_check().wait_with_output().unwrap();
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!out.status.success() && said.contains("mesh.psk_file"), "{said}");
}

#[test]
fn agents_fetch_from_a_site_cache_over_quic() {
    let s = site(27, 2 << 20);
    let root = s.publisher.path("root.json");
    let cache = cache_with(&root, &["--listen", "/ip4/127.0.0.1/udp/0/quic-v1"], Some(&s.export));
    assert!(cache.addr.contains("/udp/") && cache.addr.contains("/quic-v1/"), "{}", cache.addr);
    let mesh = format!(
        "enabled = true\nmdns = false\nlisten = [\"/ip4/127.0.0.1/udp/0/quic-v1\"]\nbootstrap = [\"{}\"]\ndeadline = \"1h\"\n",
        cache.addr
    );
    let agent = Agent::with_mesh(&s.coord, &root, "quic", &mesh);
    let (report, log) = finish(agent.spawn_check(), INSTALL_LIMIT);
    assert_eq!(report["outcome"], "staged", "{report}\n{log}");
    assert_eq!(agent.slot("b"), s.image);
    assert_eq!(bytes(&report, "peer"), s.image.len() as u64, "{report}\n{log}");
}

#[test]
fn a_late_comer_finds_the_holder_of_a_release_through_kademlia() {
    let s = site(28, 3 << 20);
    let root = s.publisher.path("root.json");
    // A hub that holds nothing: the only peer either device is configured with (no mDNS).
    let hub = cache_with(&root, &["--listen", "/ip4/127.0.0.1/tcp/0"], None);
    let (_seed, mut seed_process, _addr) = seeded_daemon_with(&s, "seed", &format!("bootstrap = [\"{}\"]\n", hub.addr));

    let late = Agent::new(&s.coord, &root, "late", std::slice::from_ref(&hub.addr), "1h");
    let (report, log) = finish(late.spawn_check(), INSTALL_LIMIT);
    let _ = seed_process.kill();
    let _ = seed_process.wait();
    assert_eq!(report["outcome"], "staged", "{report}\n{log}");
    assert_eq!(late.slot("b"), s.image);
    // The hub has no chunk to give, so every peer byte came from the seed, which only a
    // provider record could have led the late-comer to.
    assert_eq!(hub.stat("served_chunks"), Some(0));
    assert!(bytes(&report, "peer") > 0, "nothing came from the seed: {report}\n{log}");
    assert_eq!(bytes(&report, "peer") + bytes(&report, "cdn"), s.image.len() as u64, "{report}");
}

#[test]
fn a_site_cache_prefetches_the_live_releases_of_its_product() {
    let s = site(29, 3 << 20);
    let root = s.publisher.path("root.json");
    // A read-only `cache` token of the product, made by an admin.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let token = rt.block_on(async {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let body = serde_json::json!({ "scope": "cache", "product": PRODUCT, "label": "site-cache" });
        let resp = reqwest::Client::new()
            .post(format!("{}/v1/tokens", s.coord.url))
            .bearer_auth(ADMIN)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), reqwest::StatusCode::CREATED);
        resp.json::<serde_json::Value>().await.unwrap()["token"].as_str().unwrap().to_owned()
    });
    let token_file = s.publisher.path("cache-token");
    std::fs::write(&token_file, &token).unwrap();
    // The release's distinct chunk objects, as the export holds them: (count, bytes).
    let (chunks, object_bytes) = std::fs::read_dir(s.export.join("chunks"))
        .unwrap()
        .flat_map(|d| std::fs::read_dir(d.unwrap().path()).unwrap())
        .fold((0u64, 0u64), |(n, b), f| (n + 1, b + f.unwrap().metadata().unwrap().len()));

    let origin_before = s.coord.bytes_served();
    let args = [
        "--listen",
        "/ip4/127.0.0.1/tcp/0",
        "--prefetch-from",
        &s.coord.url,
        "--prefetch-product",
        PRODUCT,
        "--prefetch-token-file",
        token_file.to_str().unwrap(),
        "--prefetch-every",
        "200ms",
    ];
    // No import: everything the cache holds it prefetched.
    let cache = cache_with(&root, &args, None);
    wait_for("the cache to prefetch the release", INSTALL_LIMIT, || {
        cache.stat("store_chunks").filter(|n| *n == chunks)
    });
    let prefetched = s.coord.bytes_served() - origin_before;
    assert!(
        prefetched >= object_bytes,
        "the cache fetched its chunks from the origin: {prefetched} of {object_bytes} B"
    );

    // A device of the site then gets every byte from the cache; the origin serves its index.
    let agent = Agent::new(&s.coord, &root, "dev-p", std::slice::from_ref(&cache.addr), "1h");
    let origin_before = s.coord.bytes_served();
    let (report, log) = finish(agent.spawn_check(), INSTALL_LIMIT);
    assert_eq!(report["outcome"], "staged", "{report}\n{log}");
    assert_eq!(agent.slot("b"), s.image);
    assert_eq!(bytes(&report, "peer"), s.image.len() as u64, "{report}\n{log}");
    assert!(s.coord.bytes_served() - origin_before < s.image.len() as u64 / 10);
}
