//! A site in network namespaces: each agent is its own host on a bridge, finds the others
//! with mDNS, and reaches the origin (coordinator) over one shaped link (`tc tbf`).
//! Needs root (CI runs as root); fails loudly without it.

use std::process::{Child, Command};
use std::time::Duration;

use crate::support::*;

/// Agents on the site.
const AGENTS: usize = 10;
/// The origin uplink's rate.
const UPLINK: &str = "40mbit";
/// Liveness bound of the whole site's install (not a timing assertion).
const SITE_LIMIT: Duration = Duration::from_secs(300);

pub(crate) fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip (iproute2)");
    assert!(out.status.success(), "ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
}

/// A bridge in this namespace with hosts (namespaces) attached; removed on drop.
pub(crate) struct Net {
    tag: String,
    pub(crate) subnet: String,
    hosts: Vec<String>,
}

impl Net {
    pub(crate) fn new() -> Self {
        // Tests of one process run in parallel: each site gets its own names and subnet.
        static SITES: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let k = SITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let n = (std::process::id() + 83 * k) % 250;
        let net = Self { tag: format!("fl{n}"), subnet: format!("10.213.{n}"), hosts: Vec::new() };
        // Leftovers of a run that was killed before it could clean up.
        for k in 0..=255 {
            let _ = Command::new("ip").args(["netns", "del", &format!("{}h{k}", net.tag)]).output();
        }
        let _ = Command::new("ip").args(["link", "del", &net.bridge()]).output();
        ip(&["link", "add", &net.bridge(), "type", "bridge"]);
        // mDNS is multicast: let the bridge flood it rather than snoop on IGMP.
        std::fs::write(format!("/sys/class/net/{}/bridge/multicast_snooping", net.bridge()), "0")
            .expect("snooping off");
        ip(&["addr", "add", &format!("{}.254/24", net.subnet), "dev", &net.bridge()]);
        ip(&["link", "set", &net.bridge(), "up"]);
        net
    }

    fn bridge(&self) -> String {
        format!("{}br", self.tag)
    }

    /// Adds host `k` (a namespace with `eth0` at `<subnet>.k`); returns the namespace name.
    pub(crate) fn host(&mut self, k: u8) -> String {
        let ns = format!("{}h{k}", self.tag);
        let (outer, inner) = (format!("{}v{k}", self.tag), format!("{}p{k}", self.tag));
        ip(&["netns", "add", &ns]);
        self.hosts.push(ns.clone());
        ip(&["link", "add", &outer, "type", "veth", "peer", "name", &inner]);
        ip(&["link", "set", &inner, "netns", &ns]);
        ip(&["-n", &ns, "link", "set", &inner, "name", "eth0"]);
        ip(&["-n", &ns, "addr", "add", &format!("{}.{k}/24", self.subnet), "dev", "eth0"]);
        ip(&["-n", &ns, "link", "set", "eth0", "up"]);
        ip(&["-n", &ns, "link", "set", "lo", "up"]);
        ip(&["link", "set", &outer, "master", &self.bridge()]);
        ip(&["link", "set", &outer, "up"]);
        ns
    }

    /// Shapes what host `ns` sends (the origin's uplink to the site).
    pub(crate) fn shape(&self, ns: &str, rate: &str) {
        let out = Command::new("ip")
            .args(["netns", "exec", ns, "tc", "qdisc", "add", "dev", "eth0", "root", "tbf", "rate", rate])
            .args(["burst", "64kb", "latency", "200ms"])
            .output()
            .expect("run tc");
        assert!(out.status.success(), "tc tbf: {}", String::from_utf8_lossy(&out.stderr));
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for ns in &self.hosts {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
        let _ = Command::new("ip").args(["link", "del", &self.bridge()]).output();
    }
}

/// Kills the agents on drop.
pub(crate) struct Daemons(pub(crate) Vec<Child>);

impl Drop for Daemons {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Object bytes of every distinct chunk of an export: what the origin must serve at least once.
fn unique_object_bytes(export: &std::path::Path) -> u64 {
    let mut total = 0;
    for fan in std::fs::read_dir(export.join("chunks")).expect("export chunks") {
        for f in std::fs::read_dir(fan.expect("fan").path()).expect("fan dir") {
            total += f.expect("chunk").metadata().expect("meta").len();
        }
    }
    total
}

#[test]
fn a_site_of_ten_agents_behind_a_shaped_uplink_pulls_each_chunk_from_the_origin_about_once() {
    let mut net = Net::new();
    let origin = net.host(1);
    net.shape(&origin, UPLINK);
    let coord = Coordinator::start_in(Some(&origin), &format!("{}.1:0", net.subnet));
    let publisher = Publisher::new(&coord);
    let img = image(31, 8 << 20);
    std::fs::write(publisher.path("v1.img"), &img).unwrap();
    let id = publisher.release("1.0.0", &publisher.path("v1.img"));
    // The export is only used to count the release's unique object bytes.
    let export = publisher.path("export");
    publisher.export(id, &export);
    let unique = unique_object_bytes(&export);
    let before = coord.bytes_served();

    let root = publisher.path("root.json");
    let mesh = "enabled = true\nmdns = true\nlisten = [\"/ip4/0.0.0.0/tcp/0\"]\ndeadline = \"60s\"\n";
    let agents: Vec<Agent> = (0..AGENTS).map(|i| Agent::with_mesh(&coord, &root, &format!("dev-{i}"), mesh)).collect();
    let hosts: Vec<String> = (0..AGENTS).map(|i| net.host(10 + i as u8)).collect();
    let _daemons = Daemons(agents.iter().zip(&hosts).map(|(a, ns)| a.spawn_run(Some(ns))).collect());

    for (i, agent) in agents.iter().enumerate() {
        wait_for(&format!("agent {i} to stage the release"), SITE_LIMIT, || {
            (agent.status()["state"] == "staged").then_some(())
        });
        assert_eq!(agent.slot("b"), img, "agent {i} holds the published image\n{}", agent.log());
    }
    let origin_bytes = coord.bytes_served() - before;
    let ratio = origin_bytes as f64 / unique as f64;
    let peer_bytes: u64 = agents.iter().map(|a| a.status()["target"]["bytes"]["peer"].as_u64().unwrap_or(0)).sum();
    println!(
        "site: agents={AGENTS} unique_bytes={unique} origin_bytes={origin_bytes} ratio={ratio:.3} peer_bytes={peer_bytes}"
    );
    assert!(
        origin_bytes as f64 <= 1.1 * unique as f64,
        "the origin served {origin_bytes} B for {unique} B of unique objects (ratio {ratio:.2})\nagent 0:\n{}",
        agents[0].log()
    );
    assert!(peer_bytes > 0);
}

#[test]
fn a_peer_cut_off_mid_transfer_leaves_the_others_to_finish() {
    let mut net = Net::new();
    let origin = net.host(1);
    let coord = Coordinator::start_in(Some(&origin), &format!("{}.1:0", net.subnet));
    let publisher = Publisher::new(&coord);
    let img = image(41, 4 << 20);
    std::fs::write(publisher.path("v1.img"), &img).unwrap();
    publisher.release("1.0.0", &publisher.path("v1.img"));
    let root = publisher.path("root.json");
    let mesh = "enabled = true\nmdns = true\nlisten = [\"/ip4/0.0.0.0/tcp/0\"]\ndeadline = \"10s\"\n";

    let seed = Agent::with_mesh(&coord, &root, "seed", mesh);
    let seed_host = net.host(10);
    let _seed = Daemons(vec![seed.spawn_run(Some(&seed_host))]);
    wait_for("the seed to stage the release", SITE_LIMIT, || (seed.status()["state"] == "staged").then_some(()));

    // The late-comer is slowed down so the seed's link can be cut while it downloads.
    let late = Agent::with_mesh(&coord, &root, "late", mesh);
    let config = late.dir.path().join("agent.toml");
    let text =
        std::fs::read_to_string(&config).unwrap().replace("[device_id]", "max_download_rate = 1000000\n[device_id]");
    std::fs::write(&config, text).unwrap();
    let _late = Daemons(vec![late.spawn_run(Some(&net.host(11)))]);
    let downloads = late.dir.path().join("state/downloads.log");
    wait_for("a few chunks from the seed", SITE_LIMIT, || {
        let n = std::fs::read_to_string(&downloads).unwrap_or_default().lines().filter(|l| l.contains("peer")).count();
        (n >= 3).then_some(())
    });
    // Cut off, not killed: the seed's connections stay open on the late-comer's side and
    // its requests go unanswered until they time out.
    ip(&["netns", "exec", &seed_host, "ip", "link", "set", "eth0", "down"]);

    wait_for("the late-comer to stage the release", SITE_LIMIT, || (late.status()["state"] == "staged").then_some(()));
    assert_eq!(late.slot("b"), img, "the install finished with the right bytes\n{}", late.log());
    let bytes = late.status()["target"]["bytes"].clone();
    let (peer, cdn) = (bytes["peer"].as_u64().unwrap_or(0), bytes["cdn"].as_u64().unwrap_or(0));
    assert!(peer > 0 && cdn > 0, "some from the seed, the rest from the CDN: {bytes}");
    assert_eq!(peer + cdn, img.len() as u64, "{bytes}");
}
