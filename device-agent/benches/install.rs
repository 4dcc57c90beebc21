//! `cargo bench -p flotilla-agent --bench install`: installs a 1 GiB image (FLOTILLA_BENCH_MIB
//! to change) into a `file` slot from a local coordinator and reports the agent's peak RSS
//! (VmHWM of this process, which runs the agent library; the coordinator and the publisher
//! are separate processes) and its install rate next to `dd`'s sequential write rate on the
//! same disk (FLOTILLA_BENCH_DIR, default the temp dir). Last line:
//! `install: peak_rss_mib=<n> write_mb_s=<n> dd_mb_s=<n> ratio=<n>`.
//!
//! The install rate is end to end: fetch every chunk over loopback HTTP, verify, write,
//! fdatasync, then read the whole slot back and hash it; so it understates the raw write rate.

#[allow(dead_code, unreachable_pub)]
#[path = "../tests/it/support.rs"]
mod support;

use std::io::Write as _;
use std::time::Instant;

use flotilla_agent::agent::Agent;
use flotilla_agent::config::Config;
use support::{Coordinator, Device, DeviceOptions, Publisher, SlotKind};

fn vm_hwm_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn main() {
    let mib: u64 = std::env::var("FLOTILLA_BENCH_MIB").ok().and_then(|v| v.parse().ok()).unwrap_or(1024);
    let size = mib << 20;
    let base = std::env::var_os("FLOTILLA_BENCH_DIR").map(std::path::PathBuf::from).unwrap_or_else(std::env::temp_dir);
    let work = tempfile::tempdir_in(&base).expect("bench dir");

    // The image, written in 1 MiB blocks so this process never holds it.
    let img = work.path().join("image.bin");
    {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&img).expect("image"));
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut block = vec![0u8; 1 << 20];
        for _ in 0..mib {
            for b in block.chunks_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                b.copy_from_slice(&x.to_le_bytes()[..b.len()]);
            }
            f.write_all(&block).expect("write image");
        }
        f.flush().expect("flush");
    }
    let coord = Coordinator::start();
    let publisher = Publisher::new(&coord);
    let t = Instant::now();
    publisher.release("1.0.0", &img, &[]);
    eprintln!("published {mib} MiB in {:.1}s", t.elapsed().as_secs_f64());
    std::fs::remove_file(&img).ok();

    let dev = Device { dir: tempfile::tempdir_in(&base).expect("device dir"), kind: SlotKind::File };
    std::fs::copy(publisher.path("root.json"), dev.path("trust-root.json")).expect("root");
    dev.write_config(&coord.url, &DeviceOptions::default());
    let mut config = Config::load(&dev.path("agent.toml")).expect("config");
    config.parallel_downloads = 8;
    let agent = Agent::new(config).expect("agent");
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let before = vm_hwm_kib();
    let t = Instant::now();
    let report = runtime.block_on(agent.check_once()).expect("install");
    let secs = t.elapsed().as_secs_f64();
    let peak = vm_hwm_kib();
    eprintln!("agent: {report:?} in {secs:.1}s (VmHWM before {before} KiB, after {peak} KiB)");
    let write_mb_s = size as f64 / 1e6 / secs;

    // dd: sequential write of the same size, synced, on the same disk.
    let dd_out = dev.path("dd.img");
    let t = Instant::now();
    let status = std::process::Command::new("dd")
        .arg("if=/dev/zero")
        .arg(format!("of={}", dd_out.display()))
        .args(["bs=1M", &format!("count={mib}"), "conv=fdatasync", "status=none"])
        .status()
        .expect("run dd");
    assert!(status.success(), "dd failed");
    let dd_mb_s = size as f64 / 1e6 / t.elapsed().as_secs_f64();
    let peak_mib = peak as f64 / 1024.0;
    println!(
        "install: peak_rss_mib={peak_mib:.1} write_mb_s={write_mb_s:.1} dd_mb_s={dd_mb_s:.1} ratio={:.2}",
        write_mb_s / dd_mb_s
    );
}
