//! Chunk + hash throughput, side by side with `casync make` on the same file in the same run.
//!
//! ```text
//! cargo bench -p flotilla-core --bench chunking
//! FLOTILLA_BENCH_INPUT=/path/to/rootfs.img cargo bench -p flotilla-core --bench chunking
//! ```
//! Environment:
//! - `FLOTILLA_BENCH_INPUT`: a file to chunk; otherwise a generated image (see
//!   `support/sample_image.rs`: text-like, random, zero and repeated 512 KiB extents);
//! - `FLOTILLA_BENCH_MB`: size of the generated image in MiB (default 256);
//! - `FLOTILLA_BENCH_RUNS`: runs of each tool, the fastest counts (default 3).
//!
//! Flotilla's figure is `Chunker::chunk_reader` over the file: FastCDC cut points, a BLAKE3 id
//! per chunk and the whole image's SHA-256 and BLAKE3, in one pass. casync's is
//! `casync make --store=DIR out.caibx FILE` with the same 16/64/256 KiB chunk sizes, which also
//! compresses chunks and writes them to its store; so the bench also prints, for reference,
//! Flotilla doing the same (chunk, zstd, write objects). The file is read once first, so both
//! read it from the page cache. Both get MB/s (10^6 bytes a second of input, wall clock) and
//! MB/s per CPU-second (input over user+system CPU time, all threads), which is the per-core
//! figure DESIGN.md's target is about. The last line is
//! `chunking: flotilla_mb_s=<n> casync_mb_s=<n> ratio=<flotilla/casync>`.

use std::collections::HashSet;
use std::fs::{self, File};
use std::io::{self, BufWriter, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use flotilla_core::chunking::{ChunkParams, Chunker, cut_points};
use flotilla_core::ids::ChunkId;
use flotilla_core::object;
use sha2::Digest;

#[path = "support/sample_image.rs"]
mod sample_image;

type Res<T = ()> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

const DEFAULT_MB: u64 = 256;
const DEFAULT_RUNS: u32 = 3;
/// How often the casync child's peak RSS is sampled.
const RSS_POLL: Duration = Duration::from_millis(5);

fn main() {
    if let Err(e) = run() {
        eprintln!("chunking bench failed: {e}");
        std::process::exit(1);
    }
}

fn env_number<T: std::str::FromStr>(name: &str, default: T) -> Res<T> {
    match std::env::var(name) {
        Ok(v) => v.parse().map_err(|_| format!("{name}={v:?} is not a valid number").into()),
        Err(_) => Ok(default),
    }
}

/// One timed run of either tool.
#[derive(Debug, Clone, Copy)]
struct Sample {
    wall: Duration,
    cpu: Duration,
    peak_rss_kib: Option<u64>,
}

impl Sample {
    fn describe(&self, bytes: u64) -> String {
        format!(
            "{:.3} s, {:.0} MB/s, cpu {:.2} s = {:.0} MB/s per core{}",
            self.wall.as_secs_f64(),
            mb_s(bytes, self.wall),
            self.cpu.as_secs_f64(),
            mb_s(bytes, self.cpu),
            self.peak_rss_kib.map(|k| format!(", peak RSS {:.1} MiB", k as f64 / 1024.0)).unwrap_or_default()
        )
    }
}

fn mb_s(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / 1e6 / d.as_secs_f64().max(1e-9)
}

fn fastest(samples: &[Sample]) -> Option<Sample> {
    samples.iter().copied().min_by_key(|s| s.wall)
}

fn run() -> Res {
    let casync = find_on_path("casync").ok_or(
        "`casync` is not on PATH; the benchmark compares against it. Install it with \
         `sudo apt-get install -y casync` (Debian package casync) and run again",
    )?;
    let runs: u32 = env_number("FLOTILLA_BENCH_RUNS", DEFAULT_RUNS)?.max(1);
    let work = tempfile::Builder::new().prefix("flotilla-bench-").tempdir()?;

    let input: PathBuf = match std::env::var_os("FLOTILLA_BENCH_INPUT") {
        Some(path) => {
            println!("input: {}", Path::new(&path).display());
            path.into()
        }
        None => {
            let mb: u64 = env_number("FLOTILLA_BENCH_MB", DEFAULT_MB)?;
            if mb == 0 {
                return Err("FLOTILLA_BENCH_MB must be at least 1".into());
            }
            let path = work.path().join("image.img");
            let mut out = BufWriter::with_capacity(1 << 20, File::create(&path)?);
            io::copy(&mut sample_image::SampleImage::new(1, mb << 20), &mut out)?;
            out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
            println!("input: generated {mb} MiB (text-like, random, zero and repeated extents; seed 1)");
            path
        }
    };
    let size = fs::metadata(&input)?.len();
    // Both tools read the file from the page cache, so neither pays for the disk.
    io::copy(&mut File::open(&input)?, &mut io::sink())?;
    let params = ChunkParams::IMAGE;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "{:.1} MiB, chunk sizes {}/{}/{} KiB, {threads} cores, best of {runs} runs each",
        size as f64 / f64::from(1u32 << 20),
        params.min >> 10,
        params.avg >> 10,
        params.max >> 10
    );

    // Flotilla: chunk + ids + whole-image SHA-256 and BLAKE3.
    let mut ours = Vec::new();
    let mut result = None;
    for i in 1..=runs {
        reset_peak_rss();
        let cpu = self_cpu()?;
        let start = Instant::now();
        let chunked = Chunker::new(params).chunk_reader(File::open(&input)?)?;
        let wall = start.elapsed();
        let sample = Sample { wall, cpu: self_cpu()?.saturating_sub(cpu), peak_rss_kib: status_kib("self", "VmHWM") };
        println!("flotilla    run {i}: {}", sample.describe(size));
        ours.push(sample);
        if result.as_ref().is_some_and(|r| r != &chunked) {
            return Err("two runs over the same input gave different chunks".into());
        }
        result = Some(chunked);
    }
    let chunked = result.ok_or("no run")?;
    let distinct: HashSet<ChunkId> = chunked.index.entries().iter().map(|e| e.id).collect();

    // casync make, same file, same chunk sizes.
    let mut theirs = Vec::new();
    let mut casync_chunks = 0;
    for i in 1..=runs {
        let store = work.path().join("casync.castr");
        let caibx = work.path().join("out.caibx");
        let _ = fs::remove_dir_all(&store);
        let _ = fs::remove_file(&caibx);
        let sample = run_casync(&casync, &store, &caibx, &input, params)?;
        println!("casync make run {i}: {}", sample.describe(size));
        theirs.push(sample);
        casync_chunks = count_files(&store)?;
    }

    // For reference: Flotilla doing what casync make does (chunk, compress, write a store).
    let store = work.path().join("flotilla-store");
    fs::create_dir_all(&store)?;
    let mut stored = HashSet::new();
    let start = Instant::now();
    let cpu = self_cpu()?;
    Chunker::new(params).chunk_reader_with(File::open(&input)?, |chunk| {
        if stored.insert(chunk.id) {
            fs::write(store.join(chunk.id.to_hex()), object::encode(chunk.data, object::DEFAULT_LEVEL))?;
        }
        Ok(())
    })?;
    let with_store = Sample { wall: start.elapsed(), cpu: self_cpu()?.saturating_sub(cpu), peak_rss_kib: None };

    let stages = stage_costs(&input, params)?;

    let ours = fastest(&ours).ok_or("no flotilla run")?;
    let theirs = fastest(&theirs).ok_or("no casync run")?;
    println!(
        "chunks: flotilla {} ({} distinct, average {:.1} KiB), casync {casync_chunks} distinct in its store",
        chunked.index.len(),
        distinct.len(),
        size as f64 / chunked.index.len().max(1) as f64 / 1024.0
    );
    println!(
        "flotilla chunk+hash+zstd+store (what casync make also does): {}; {:.2}x casync",
        with_store.describe(size),
        mb_s(size, with_store.wall) / mb_s(size, theirs.wall)
    );
    println!(
        "per core: flotilla {:.0} MB/s, casync {:.0} MB/s, ratio {:.2} (target: >= 1000 MB/s per core, >= 3x casync)",
        mb_s(size, ours.cpu),
        mb_s(size, theirs.cpu),
        mb_s(size, ours.cpu) / mb_s(size, theirs.cpu)
    );
    println!("{stages}");
    let (f, c) = (mb_s(size, ours.wall), mb_s(size, theirs.wall));
    println!("chunking: flotilla_mb_s={f:.0} casync_mb_s={c:.0} ratio={:.2}", f / c);
    Ok(())
}

/// Throughput of each stage alone on one core, over the first (up to) 64 MiB of the input in
/// memory: where the per-core time goes.
fn stage_costs(input: &Path, params: ChunkParams) -> Res<String> {
    let mut data = Vec::new();
    File::open(input)?.take(64 << 20).read_to_end(&mut data)?;
    let len = data.len() as u64;
    let time = |f: &mut dyn FnMut()| {
        let start = Instant::now();
        f();
        start.elapsed()
    };
    let mut cuts = Vec::new();
    let cut = time(&mut || cuts = cut_points(&data, params).unwrap_or_default());
    let ids = time(&mut || {
        std::hint::black_box(cuts.iter().map(|&(o, l)| ChunkId::of(&data[o..o + l])).collect::<Vec<_>>());
    });
    let sha = time(&mut || {
        std::hint::black_box(sha2::Sha256::digest(&data));
    });
    let b3 = time(&mut || {
        std::hint::black_box(blake3::hash(&data));
    });
    let all = cut + ids + sha + b3;
    Ok(format!(
        "one core, each stage alone over {:.0} MiB: FastCDC cut {:.0} MB/s, chunk BLAKE3 {:.0} MB/s, image SHA-256 {:.0} MB/s, \
         image BLAKE3 {:.0} MB/s; all four in series {:.0} MB/s",
        len as f64 / f64::from(1u32 << 20),
        mb_s(len, cut),
        mb_s(len, ids),
        mb_s(len, sha),
        mb_s(len, b3),
        mb_s(len, all)
    ))
}

fn run_casync(casync: &Path, store: &Path, caibx: &Path, input: &Path, params: ChunkParams) -> Res<Sample> {
    let cpu = children_cpu()?;
    let start = Instant::now();
    let mut child = Command::new(casync)
        .arg("make")
        .arg(format!("--store={}", store.display()))
        .arg(format!("--chunk-size={}:{}:{}", params.min, params.avg, params.max))
        .arg(caibx)
        .arg(input)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let proc_dir = child.id().to_string();
    let mut peak = None;
    let status = loop {
        // Sampled, so a short spike between two samples can be missed; VmHWM itself is a peak.
        if let Some(kib) = status_kib(&proc_dir, "VmHWM") {
            peak = Some(peak.map_or(kib, |p: u64| p.max(kib)));
        }
        if let Some(status) = child.try_wait()? {
            break status;
        }
        std::thread::sleep(RSS_POLL);
    };
    let wall = start.elapsed();
    if !status.success() {
        let mut err = String::new();
        if let Some(mut stderr) = child.stderr.take() {
            stderr.read_to_string(&mut err)?;
        }
        return Err(format!("casync make failed ({status}): {}", err.trim()).into());
    }
    Ok(Sample { wall, cpu: children_cpu()?.saturating_sub(cpu), peak_rss_kib: peak })
}

fn find_on_path(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?).map(|dir| dir.join(name)).find(|p| p.is_file())
}

fn count_files(dir: &Path) -> io::Result<usize> {
    let mut n = 0;
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            n += count_files(&entry.path())?;
        } else {
            n += 1;
        }
    }
    Ok(n)
}

/// A `kB` field of `/proc/<pid>/status` (`VmHWM` is the peak resident set size).
fn status_kib(pid: &str, field: &str) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with(field) && l[field.len()..].starts_with(':'))?;
    line[field.len() + 1..].trim().trim_end_matches("kB").trim().parse().ok()
}

/// Resets this process's VmHWM to its current RSS (Linux `clear_refs` value 5), so the next
/// reading is the peak of the run alone. Without it the reading is the process's peak so far.
fn reset_peak_rss() {
    let _ = fs::write("/proc/self/clear_refs", "5");
}

/// user+system CPU time of this process (all threads), or of its waited-for children.
fn proc_cpu(children: bool) -> Res<Duration> {
    let stat = fs::read_to_string("/proc/self/stat")?;
    // Fields after the command name, which is in parentheses and may contain spaces.
    let rest = stat.rsplit_once(')').ok_or("unexpected /proc/self/stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state): utime is field 14, stime 15, cutime 16, cstime 17.
    let at = if children { 13 } else { 11 };
    let ticks: u64 = fields
        .get(at..at + 2)
        .ok_or("short /proc/self/stat")?
        .iter()
        .map(|f| f.parse::<u64>())
        .sum::<Result<u64, _>>()?;
    Ok(Duration::from_secs_f64(ticks as f64 / clock_ticks()))
}

fn self_cpu() -> Res<Duration> {
    proc_cpu(false)
}

fn children_cpu() -> Res<Duration> {
    proc_cpu(true)
}

/// `sysconf(_SC_CLK_TCK)` without libc: ask getconf, fall back to Linux's usual 100.
fn clock_ticks() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100.0)
    })
}
