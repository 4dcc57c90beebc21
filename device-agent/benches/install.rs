//! `cargo bench -p flotilla-agent --bench install`: installs a 1 GiB image (FLOTILLA_BENCH_MIB
//! to change) into a `file` slot from a local coordinator and reports the agent's peak RSS
//! (VmHWM of this process, which runs the agent library; the coordinator and the publisher
//! are separate processes) and its install rate next to `dd`'s sequential write rate on the
//! same disk (FLOTILLA_BENCH_DIR, default the temp dir). Last line:
//! `install: peak_rss_mib=<n> write_mb_s=<n> dd_mb_s=<n> ratio=<n>`.
//!
//! Then (unless FLOTILLA_BENCH_DELTA=0) a second release, the image with 64 scattered 4 KiB
//! edits and one densely edited 8 MiB span, is installed from the patch the CLI builds (from
//! the installed image, `--delta-base`), and a line before the last one gives
//! the agent's peak RSS during that install (VmHWM reset first):
//! `install-delta: peak_rss_mib=<n> delta_bytes=<n> cdn_bytes=<n> secs=<n>`.
//!
//! The write rate is the image size over the agent's whole `check_once`: enroll, check,
//! index, every chunk fetched over loopback HTTP, verified and written, fdatasync'ed at each
//! checkpoint, and the slot read back *from the media* (page cache dropped) and hashed before
//! the switch; dd's rate is 1 MiB writes of zeros plus one fdatasync. Both run 3 times,
//! alternated (the disk's rate wanders), and the medians are compared.
//! The origin is a release build of the coordinator (built here with a nested
//! `cargo build --release` into the same target directory): a debug-build origin measures the
//! coordinator, not the agent.

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

/// Builds the coordinator in release mode into this bench's target directory; returns it.
fn release_coordinator() -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("bench path");
    // <target>/release/deps/install-<hash>
    let profile = exe.parent().and_then(std::path::Path::parent).expect("target profile dir").to_path_buf();
    let mut cmd = std::process::Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.args(["build", "--quiet", "--release", "-p", "flotilla-coordinator", "--bin", "flotilla-coordinator"])
        .current_dir(env!("CARGO_MANIFEST_DIR"));
    if let Some(target) = profile.parent() {
        cmd.env("CARGO_TARGET_DIR", target);
    }
    assert!(cmd.status().expect("run cargo build").success(), "building the release coordinator failed");
    let bin = profile.parent().expect("target dir").join("release").join("flotilla-coordinator");
    assert!(bin.exists(), "{} is missing after the build", bin.display());
    bin
}

/// Resets this process's VmHWM to its current RSS (Linux `clear_refs` 5).
fn reset_hwm() {
    std::fs::write("/proc/self/clear_refs", b"5").expect("reset VmHWM");
}

/// A second release installed from a patch: the installed image with scattered edits, its
/// patch built by the CLI against the installed image (`--delta-base`). Commits the first
/// install, then measures the agent's peak RSS while it fetches and applies the patch into
/// the other slot. Returns the report line.
/// Install and dd runs alternated (see `main`).
const ROUNDS: usize = 3;

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// dd's sequential write rate of `mib` MiB into a new file on the same disk, synced at the end
/// (`conv=fdatasync`), in MB/s.
fn dd_rate(out: &std::path::Path, mib: u64) -> f64 {
    let t = Instant::now();
    let status = std::process::Command::new("dd")
        .arg("if=/dev/zero")
        .arg(format!("of={}", out.display()))
        .args(["bs=1M", &format!("count={mib}"), "conv=fdatasync", "status=none"])
        .status()
        .expect("run dd");
    assert!(status.success(), "dd failed");
    let rate = (mib << 20) as f64 / 1e6 / t.elapsed().as_secs_f64();
    std::fs::remove_file(out).ok();
    rate
}

fn delta_install(
    runtime: &tokio::runtime::Runtime,
    agent: &Agent,
    publisher: &Publisher,
    dev: &Device,
    size: u64,
) -> String {
    use std::os::unix::fs::FileExt as _;
    let boot = runtime.block_on(agent.boot_check()).expect("boot-check");
    eprintln!("boot-check: {boot:?}");
    let (v1, v2) = (dev.path("slot-b.img"), dev.path("v2.img"));
    std::fs::copy(&v1, &v2).expect("copy the installed image");
    let f = std::fs::OpenOptions::new().write(true).open(&v2).expect("v2");
    for k in 0..64u64 {
        f.write_all_at(&[0xa5u8; 4096], k * (size / 64) + 12_345).expect("edit v2");
    }
    // And one densely edited span (16 bytes every 2 KiB over 8 MiB): patch regions as large as
    // the codec's window, the apply's memory worst case.
    for k in 0..4096u64 {
        f.write_all_at(&[0x5au8; 16], size / 3 + k * 2048).expect("edit v2");
    }
    drop(f);
    let t = Instant::now();
    publisher.release("2.0.0", &v2, &["--delta-base", v1.to_str().expect("path")]);
    eprintln!("published v2 and its patch in {:.1}s", t.elapsed().as_secs_f64());
    std::fs::remove_file(&v2).ok();
    reset_hwm();
    let before = vm_hwm_kib();
    let t = Instant::now();
    let report = runtime.block_on(agent.check_once()).expect("install from the patch");
    let secs = t.elapsed().as_secs_f64();
    let peak = vm_hwm_kib();
    eprintln!("agent (patch): {report:?} in {secs:.1}s (VmHWM after reset {before} KiB, after {peak} KiB)");
    let bytes = match report {
        flotilla_agent::agent::CheckReport::Staged { bytes, .. } => bytes,
        other => panic!("the patch install did not stage: {other:?}"),
    };
    format!(
        "install-delta: peak_rss_mib={:.1} delta_bytes={} cdn_bytes={} secs={secs:.1}",
        peak as f64 / 1024.0,
        bytes.delta,
        bytes.cdn
    )
}

fn main() {
    // The agent logs its install phases (fetch, verify, write, sync, read-back hash) at info.
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(
            std::env::var("RUST_LOG").unwrap_or_else(|_| "flotilla_agent=info".into()),
        ))
        .with_writer(std::io::stderr)
        .init();
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
    let coord = Coordinator::start_bin(&release_coordinator());
    let publisher = Publisher::new(&coord);
    let t = Instant::now();
    publisher.release("1.0.0", &img, &[]);
    eprintln!("published {mib} MiB in {:.1}s", t.elapsed().as_secs_f64());
    std::fs::remove_file(&img).ok();

    // This disk's rate wanders a lot from run to run (a dd right after a 1 GiB write has run at
    // a quarter of the next one's rate), so dd runs and fresh installs of the same release
    // (each a new device: state directory and slots) alternate, and the medians are compared.
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let before = vm_hwm_kib();
    let (mut install_rates, mut dd_rates, mut kept) = (Vec::new(), Vec::new(), None);
    for round in 0..ROUNDS {
        dd_rates.push(dd_rate(&work.path().join("dd.img"), mib));
        let dev = Device { dir: tempfile::tempdir_in(&base).expect("device dir"), kind: SlotKind::File };
        std::fs::copy(publisher.path("root.json"), dev.path("trust-root.json")).expect("root");
        dev.write_config(&coord.url, &DeviceOptions { id: format!("bench-{round}"), ..DeviceOptions::default() });
        let mut config = Config::load(&dev.path("agent.toml")).expect("config");
        config.parallel_downloads = 8;
        let agent = Agent::new(config).expect("agent");
        let t = Instant::now();
        let report = runtime.block_on(agent.check_once()).expect("install");
        let secs = t.elapsed().as_secs_f64();
        eprintln!("agent round {round}: {report:?} in {secs:.2}s");
        install_rates.push(size as f64 / 1e6 / secs);
        if round == 0 {
            kept = Some((dev, agent));
        }
    }
    let peak = vm_hwm_kib();
    eprintln!("VmHWM before {before} KiB, after {peak} KiB");
    eprintln!("install runs (MB/s): {install_rates:.1?}");
    eprintln!("dd runs (MB/s): {dd_rates:.1?}");
    let (write_mb_s, dd_mb_s) = (median(&mut install_rates), median(&mut dd_rates));
    let (dev, agent) = kept.expect("round 0");
    let peak_mib = peak as f64 / 1024.0;
    if std::env::var("FLOTILLA_BENCH_DELTA").as_deref() != Ok("0") {
        println!("{}", delta_install(&runtime, &agent, &publisher, &dev, size));
    }
    println!(
        "install: peak_rss_mib={peak_mib:.1} write_mb_s={write_mb_s:.1} dd_mb_s={dd_mb_s:.1} ratio={:.2}",
        write_mb_s / dd_mb_s
    );
}
