//! Fleet benchmark: 30 devices behind one shaped origin link (network namespaces, a bridge,
//! `tc tbf` on the origin's uplink) install one release three ways, and the figures go on the
//! last line:
//! - Flotilla: agents with the mesh on (mDNS, peer-first, origin rendezvous);
//! - BitTorrent: `aria2c` from Debian (installed with apt-get when missing), seeded on the
//!   origin host, leechers finding each other with local peer discovery, no tracker or DHT;
//! - CDN only: agents with the mesh off, every byte from the origin.
//!
//! The host's bridge netfilter hooks (`net.bridge.bridge-nf-call-*`) are off during the
//! runs and restored after.
//!
//! `cargo bench -p flotilla-mesh --bench fleet`. Needs root (network namespaces); without it
//! the bench says so and stops. Settings (environment): `FLOTILLA_FLEET_MIB` release size in
//! MiB (256), `FLOTILLA_FLEET_DEVICES` (30), `FLOTILLA_FLEET_UPLINK` the origin link's rate as
//! `tc` writes it (`100mbit`), `FLOTILLA_FLEET_SKIP` a comma list of runs to leave out
//! (`flotilla`, `bittorrent`, `cdn`; their figure prints as `nan`), `FLOTILLA_FLEET_TRANSPORT`
//! the agents' mesh transport (`tcp`, the default, or `quic`), `FLOTILLA_FLEET_LOGS` a directory
//! to copy each agent's log to (`agent-<n>.log`, the last run's).

#[allow(dead_code, unreachable_pub, unused_imports)]
#[path = "../tests/it/support.rs"]
mod support;

#[allow(dead_code, unreachable_pub, unused_imports)]
#[path = "../tests/it/netns.rs"]
mod netns;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use netns::{Daemons, Net};
use support::*;

/// Liveness bound of one run (not a target).
const RUN_LIMIT: Duration = Duration::from_secs(3600);
/// BitTorrent piece length.
const PIECE: usize = 1 << 20;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn main() {
    // Namespaces need CAP_SYS_ADMIN; uid 0 is what CI runs as.
    let uid = Command::new("id").arg("-u").output().map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned());
    if uid.ok().as_deref() != Some("0") {
        println!("fleet: skipped: needs root for network namespaces (run as root, as CI does)");
        return;
    }
    let mib: usize = env_or("FLOTILLA_FLEET_MIB", 256);
    let devices: usize = env_or("FLOTILLA_FLEET_DEVICES", 30);
    let uplink: String = env_or("FLOTILLA_FLEET_UPLINK", "100mbit".to_owned());
    let skip: String = env_or("FLOTILLA_FLEET_SKIP", String::new());
    let transport: String = env_or("FLOTILLA_FLEET_TRANSPORT", "tcp".to_owned());
    assert!(["tcp", "quic"].contains(&transport.as_str()), "FLOTILLA_FLEET_TRANSPORT must be tcp or quic");
    assert!((1..=200).contains(&devices), "FLOTILLA_FLEET_DEVICES must be 1-200");

    // The site's hosts share this kernel; with br_netfilter loaded (Docker loads it) every
    // frame crossing the bridge also runs the host's iptables hooks, a cost no real LAN
    // switch adds. Off for the runs (all three alike), restored after.
    let _no_bridge_nf = BridgeNetfilterOff::new();
    let mut net = Net::new();
    let origin = net.host(1);
    net.shape(&origin, &uplink);
    let hosts: Vec<String> = (0..devices).map(|i| net.host(10 + i as u8)).collect();
    let coord = Coordinator::start_in(Some(&origin), &format!("{}.1:0", net.subnet));
    let publisher = Publisher::new(&coord);
    let img_path = publisher.path("release.img");
    std::fs::write(&img_path, image(97, mib << 20)).expect("write the image");
    let id = publisher.release("1.0.0", &img_path);
    let export = publisher.path("export");
    publisher.export(id, &export);
    let unique = unique_object_bytes(&export);
    eprintln!("fleet: {devices} devices, {mib} MiB release ({unique} unique object bytes), origin link {uplink}");
    let root = publisher.path("root.json");

    let (mut flotilla_s, mut ratio) = (f64::NAN, f64::NAN);
    if !skip.contains("flotilla") {
        let before = coord.bytes_served();
        let listen = match transport.as_str() {
            "quic" => "/ip4/0.0.0.0/udp/0/quic-v1",
            _ => "/ip4/0.0.0.0/tcp/0",
        };
        let mesh = format!("enabled = true\nmdns = true\nlisten = [\"{listen}\"]\ndeadline = \"120s\"\n");
        let cpu = children_cpu_s();
        flotilla_s = agents_run(&coord, &root, &hosts, &mesh, mib);
        let cpu = children_cpu_s() - cpu;
        ratio = (coord.bytes_served() - before) as f64 / unique as f64;
        eprintln!("fleet: flotilla {flotilla_s:.1} s, {cpu:.0} agent CPU-s, origin bytes / unique bytes {ratio:.3}");
    }
    let mut bittorrent_s = f64::NAN;
    if !skip.contains("bittorrent") {
        let cpu = children_cpu_s();
        bittorrent_s = bittorrent_run(&origin, &hosts, &img_path, mib);
        let cpu = children_cpu_s() - cpu;
        eprintln!("fleet: bittorrent {bittorrent_s:.1} s, {cpu:.0} aria2c CPU-s (seed included)");
    }
    let mut cdn_s = f64::NAN;
    if !skip.contains("cdn") {
        let cpu = children_cpu_s();
        cdn_s = agents_run(&coord, &root, &hosts, "enabled = false\n", mib);
        let cpu = children_cpu_s() - cpu;
        eprintln!("fleet: cdn only {cdn_s:.1} s, {cpu:.0} agent CPU-s");
    }
    println!(
        "fleet: devices={devices} origin_bytes_ratio={ratio:.3} flotilla_s={flotilla_s:.1} bittorrent_s={bittorrent_s:.1} cdn_only_s={cdn_s:.1}"
    );
}

/// CPU-seconds (user and system) of this process's children that have exited and been
/// waited for (`cutime` and `cstime` of `/proc/self/stat`): taken around a run, the CPU its
/// daemons used, which is what bounds completion on a small machine.
fn children_cpu_s() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").expect("/proc/self/stat");
    // Fields after the command name (which may hold spaces) start at field 3.
    let rest = &stat[stat.rfind(')').expect("stat format") + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields[13].parse::<f64>().expect("cutime") + fields[14].parse::<f64>().expect("cstime");
    let hz = Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse::<f64>().ok())
        .unwrap_or(100.0);
    ticks / hz
}

/// `net.bridge.bridge-nf-call-*` set to 0 while it lives (absent without br_netfilter).
struct BridgeNetfilterOff(Vec<(String, String)>);

impl BridgeNetfilterOff {
    fn new() -> Self {
        let mut saved = Vec::new();
        for name in ["iptables", "ip6tables", "arptables"] {
            let path = format!("/proc/sys/net/bridge/bridge-nf-call-{name}");
            if let Ok(old) = std::fs::read_to_string(&path)
                && std::fs::write(&path, "0").is_ok()
            {
                saved.push((path, old));
            }
        }
        Self(saved)
    }
}

impl Drop for BridgeNetfilterOff {
    fn drop(&mut self) {
        for (path, old) in &self.0 {
            let _ = std::fs::write(path, old.trim());
        }
    }
}

/// Object bytes of every distinct chunk of an export.
fn unique_object_bytes(export: &Path) -> u64 {
    let mut total = 0;
    for fan in std::fs::read_dir(export.join("chunks")).expect("export chunks") {
        for f in std::fs::read_dir(fan.expect("fan").path()).expect("fan dir") {
            total += f.expect("chunk").metadata().expect("meta").len();
        }
    }
    total
}

/// Starts one agent daemon per host with `mesh` as its `[mesh]` section; seconds until every
/// one has staged the release.
fn agents_run(coord: &Coordinator, root: &Path, hosts: &[String], mesh: &str, mib: usize) -> f64 {
    let agents: Vec<Agent> =
        (0..hosts.len()).map(|i| Agent::with_mesh(coord, root, &format!("fleet-{i}"), mesh)).collect();
    let started = Instant::now();
    let daemons = Daemons(agents.iter().zip(hosts).map(|(a, ns)| a.spawn_run(Some(ns))).collect());
    let mut waiting: Vec<usize> = (0..agents.len()).collect();
    while !waiting.is_empty() {
        assert!(started.elapsed() < RUN_LIMIT, "{} agents did not finish", waiting.len());
        std::thread::sleep(Duration::from_millis(250));
        // The slot's index, kept once the slot is written and verified, is the cheap sign;
        // `status` confirms it. (Not the slot's size: the agent sizes the file first, and a
        // `status` process per agent every 250 ms from the start costs the fleet a tenth of
        // the machine's CPU.)
        waiting.retain(|&i| {
            let dir = agents[i].dir.path();
            let full = std::fs::metadata(dir.join("slot-b.img")).is_ok_and(|m| m.len() as usize >= mib << 20);
            let done = full && dir.join("state/slot-b.index").exists();
            !(done && agents[i].status()["state"] == "staged")
        });
    }
    let secs = started.elapsed().as_secs_f64();
    drop(daemons);
    if let Ok(dir) = std::env::var("FLOTILLA_FLEET_LOGS") {
        std::fs::create_dir_all(&dir).expect("log dir");
        for (i, a) in agents.iter().enumerate() {
            let _ = std::fs::copy(a.dir.path().join("agent.log"), Path::new(&dir).join(format!("agent-{i}.log")));
        }
    }
    secs
}

/// aria2c seeding from the origin host, one leecher per device host; seconds until every
/// leecher holds the whole file.
fn bittorrent_run(origin: &str, hosts: &[String], image: &Path, mib: usize) -> f64 {
    if Command::new("aria2c").arg("--version").stdout(Stdio::null()).status().is_err() {
        eprintln!("fleet: installing aria2 (apt-get)");
        let _ = Command::new("apt-get").args(["update", "-qq"]).status();
        let ok = Command::new("apt-get")
            .args(["install", "-y", "-qq", "aria2"])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "apt-get install aria2 failed");
    }
    let work = tempfile::tempdir().expect("tmp");
    let torrent = work.path().join("release.torrent");
    let name = image.file_name().and_then(|n| n.to_str()).expect("image name").to_owned();
    std::fs::write(&torrent, make_torrent(&std::fs::read(image).expect("read image"), &name)).expect("torrent");
    let seed_dir = image.parent().expect("image dir");
    let common = [
        "--enable-dht=false",
        "--enable-dht6=false",
        "--bt-enable-lpd=true",
        "--bt-lpd-interface=eth0",
        "--seed-ratio=0.0",
        "--file-allocation=falloc",
        "--summary-interval=0",
        "--console-log-level=warn",
        "--bt-max-peers=55",
        "--follow-torrent=false",
    ];
    let aria = |ns: &str, dir: &Path, extra: &[&str]| -> Child {
        Command::new("ip")
            .args(["netns", "exec", ns, "aria2c"])
            .args(common)
            .args(extra)
            .arg(format!("--dir={}", dir.display()))
            .arg(&torrent)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn aria2c")
    };
    let mut children = vec![aria(origin, seed_dir, &["--check-integrity=true", "--bt-seed-unverified=false"])];
    let dirs: Vec<tempfile::TempDir> = hosts.iter().map(|_| tempfile::tempdir().expect("tmp")).collect();
    let started = Instant::now();
    children.extend(hosts.iter().zip(&dirs).map(|(ns, d)| aria(ns, d.path(), &[])));
    let _daemons = Daemons(children);
    let mut waiting: Vec<usize> = (0..hosts.len()).collect();
    while !waiting.is_empty() {
        assert!(started.elapsed() < RUN_LIMIT, "{} BitTorrent leechers did not finish", waiting.len());
        std::thread::sleep(Duration::from_millis(250));
        // aria2 removes its control file once every piece is in and verified.
        waiting.retain(|&i| {
            let file = dirs[i].path().join(&name);
            let control = dirs[i].path().join(format!("{name}.aria2"));
            let done = std::fs::metadata(&file).is_ok_and(|m| m.len() as usize == mib << 20) && !control.exists();
            !done
        });
    }
    started.elapsed().as_secs_f64()
}

/// A single-file, trackerless `.torrent` (BitTorrent v1) of `data`.
fn make_torrent(data: &[u8], name: &str) -> Vec<u8> {
    let mut pieces = Vec::with_capacity(data.len().div_ceil(PIECE) * 20);
    for piece in data.chunks(PIECE) {
        pieces.extend_from_slice(&sha1(piece));
    }
    let mut out = Vec::new();
    out.extend_from_slice(b"d4:infod");
    out.extend_from_slice(format!("6:lengthi{}e", data.len()).as_bytes());
    out.extend_from_slice(format!("4:name{}:{name}", name.len()).as_bytes());
    out.extend_from_slice(format!("12:piece lengthi{PIECE}e").as_bytes());
    out.extend_from_slice(format!("6:pieces{}:", pieces.len()).as_bytes());
    out.extend_from_slice(&pieces);
    out.extend_from_slice(b"ee");
    out
}

/// SHA-1 (FIPS 180-4), for BitTorrent piece hashes only.
fn sha1(data: &[u8]) -> [u8; 20] {
    let mut h: [u32; 5] = [0x6745_2301, 0xEFCD_AB89, 0x98BA_DCFE, 0x1032_5476, 0xC3D2_E1F0];
    let mut msg = data.to_vec();
    msg.push(0x80);
    while msg.len() % 64 != 56 {
        msg.push(0);
    }
    msg.extend_from_slice(&((data.len() as u64) * 8).to_be_bytes());
    for block in msg.chunks(64) {
        let mut w = [0u32; 80];
        for (i, word) in block.chunks(4).enumerate() {
            w[i] = u32::from_be_bytes([word[0], word[1], word[2], word[3]]);
        }
        for i in 16..80 {
            w[i] = (w[i - 3] ^ w[i - 8] ^ w[i - 14] ^ w[i - 16]).rotate_left(1);
        }
        let [mut a, mut b, mut c, mut d, mut e] = h;
        for (i, wi) in w.iter().enumerate() {
            let (f, k) = match i {
                0..=19 => ((b & c) | (!b & d), 0x5A82_7999),
                20..=39 => (b ^ c ^ d, 0x6ED9_EBA1),
                40..=59 => ((b & c) | (b & d) | (c & d), 0x8F1B_BCDC),
                _ => (b ^ c ^ d, 0xCA62_C1D6),
            };
            let t = a.rotate_left(5).wrapping_add(f).wrapping_add(e).wrapping_add(k).wrapping_add(*wi);
            e = d;
            d = c;
            c = b.rotate_left(30);
            b = a;
            a = t;
        }
        for (x, y) in h.iter_mut().zip([a, b, c, d, e]) {
            *x = x.wrapping_add(y);
        }
    }
    let mut out = [0u8; 20];
    for (i, x) in h.iter().enumerate() {
        out[i * 4..][..4].copy_from_slice(&x.to_be_bytes());
    }
    out
}
