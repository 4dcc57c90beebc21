//! Patch size, encode time and the applier's memory against bsdiff, xdelta3,
//! `zstd --patch-from` and casync chunk reuse (plain `main`, prints its figures).
//!
//! `cargo bench -p flotilla-publisher --bench deltas`. Pairs come from `FLOTILLA_DELTA_PAIRS`
//! (a file of `old new` path lines) or, by default, from a corpus built once and cached under
//! `$CARGO_TARGET_DIR/delta-corpus` from consecutive releases of public npm packages (fetched
//! with `npm pack`): a multi-MiB minified JS bundle (@babel/standalone's `babel.min.js`), an
//! app directory packed as a deterministic tar (the `typescript` package), and a 256 MiB ext4
//! image (`mkfs.ext4 -d`) holding four packages. Needs `npm`, `tar`, `mkfs.ext4`, `bsdiff`,
//! `xdelta3`, `zstd` and `casync` on PATH.
//!
//! Flotilla's bytes to fetch are the smaller of its patch and its new chunk objects (zstd
//! compressed, as served). The agent's peak RSS is measured by applying the patch in a child
//! process (this binary re-run in apply mode) and reading its `VmHWM`. Above 128 MiB the C
//! bsdiff takes hours, so the `qbsdiff` crate (parallel search) stands in for it.
//!
//! Other env vars: `FLOTILLA_DELTA_ONLY` (run only the pairs whose name contains it),
//! `FLOTILLA_DELTA_VERBOSE=1` (print the patch's region table: op, lengths, payload bytes or
//! slice of the shared stream, and the shared stream),
//! `FLOTILLA_DELTA_LEVEL`, `FLOTILLA_DELTA_BSDIFF_MAX`, `FLOTILLA_DELTA_REGION_LEN` (override
//! [`EncodeOptions`] fields, for experiments), `FLOTILLA_DELTA_ANCHOR_CACHE` (a file where the other tools' sizes and times are kept per
//! pair and reused, to iterate on Flotilla's encoder without re-running them; leave it unset
//! for reported figures).
//!
//! Last line: `deltas: pairs=<n> worst_ratio_vs_best=<x> max_encode_ratio_vs_zstd=<x> max_agent_rss_mib=<x>`.

use std::collections::HashSet;
use std::io::{BufReader, BufWriter, Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use flotilla_core::chunking::{ChunkParams, Chunker};
use flotilla_core::delta::{self, DeltaLimits, EncodeOptions};

/// Set in the child that applies a patch: `OLD PATCH OUT`, tab-separated.
const CHILD_ENV: &str = "FLOTILLA_DELTA_BENCH_APPLY";
/// Above this the C bsdiff is replaced by qbsdiff.
const BSDIFF_MAX: u64 = 128 << 20;

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

fn main() -> Result<()> {
    if let Ok(spec) = std::env::var(CHILD_ENV) {
        return child_apply(&spec);
    }
    let pairs = match std::env::var("FLOTILLA_DELTA_PAIRS") {
        Ok(list) => std::fs::read_to_string(&list)?
            .lines()
            .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
            .map(|l| {
                let mut it = l.split_whitespace();
                let (old, new) = (it.next().unwrap_or_default(), it.next().unwrap_or_default());
                let name = Path::new(new).file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                (name, PathBuf::from(old), PathBuf::from(new))
            })
            .collect(),
        Err(_) => build_corpus()?,
    };
    let pairs: Vec<_> = match std::env::var("FLOTILLA_DELTA_ONLY") {
        Ok(only) => pairs.into_iter().filter(|(name, _, _)| name.contains(&only)).collect(),
        Err(_) => pairs,
    };
    let work = tempfile::tempdir()?;
    println!(
        "{:<22} {:>9} | {:>10} {:>8} {:>7} {:>10} | {:>10} {:>7} | {:>10} {:>7} | {:>10} {:>7} | {:>10} | {:>6}",
        "pair",
        "new MiB",
        "flotilla B",
        "method",
        "enc s",
        "chunks B",
        "bsdiff B",
        "s",
        "xdelta3 B",
        "s",
        "zstd B",
        "s",
        "casync B",
        "rss MiB"
    );
    let (mut worst_ratio, mut worst_encode, mut worst_rss) = (0f64, 0f64, 0f64);
    for (name, old, new) in &pairs {
        let row = measure(name, old, new, work.path())?;
        let best = [row.bsdiff.0, row.xdelta.0, row.zstd.0, row.casync].into_iter().min().unwrap_or(1).max(1);
        worst_ratio = worst_ratio.max(row.flotilla as f64 / best as f64);
        worst_encode = worst_encode.max(row.encode_s / row.zstd.1.max(1e-3));
        worst_rss = worst_rss.max(row.rss_mib);
        println!(
            "{:<22} {:>9.1} | {:>10} {:>8} {:>7.2} {:>10} | {:>10} {:>7.2} | {:>10} {:>7.2} | {:>10} {:>7.2} | {:>10} | {:>6.1}",
            name,
            row.new_size as f64 / f64::from(1 << 20),
            row.flotilla,
            row.method,
            row.encode_s,
            row.chunks,
            row.bsdiff.0,
            row.bsdiff.1,
            row.xdelta.0,
            row.xdelta.1,
            row.zstd.0,
            row.zstd.1,
            row.casync,
            row.rss_mib
        );
        println!(
            "{:<22} patch {} B ({} regions, {} copied / {} patched bytes), best anchor {} B, ratio {:.3}",
            "",
            row.patch,
            row.regions,
            row.copied,
            row.patched,
            best,
            row.flotilla as f64 / best as f64
        );
    }
    println!(
        "deltas: pairs={} worst_ratio_vs_best={worst_ratio:.3} max_encode_ratio_vs_zstd={worst_encode:.3} max_agent_rss_mib={worst_rss:.1}",
        pairs.len()
    );
    Ok(())
}

#[derive(Debug)]
struct Row {
    new_size: u64,
    flotilla: u64,
    patch: u64,
    method: String,
    regions: u32,
    copied: u64,
    patched: u64,
    encode_s: f64,
    chunks: u64,
    bsdiff: (u64, f64),
    xdelta: (u64, f64),
    zstd: (u64, f64),
    casync: u64,
    rss_mib: f64,
}

fn measure(name: &str, old: &Path, new: &Path, work: &Path) -> Result<Row> {
    let new_size = std::fs::metadata(new)?.len();
    // Publish presets: raw images cut at the image preset, bundles and archives at the bundle one.
    let params = if name.ends_with(".img") || new_size > 64 << 20 { ChunkParams::IMAGE } else { ChunkParams::BUNDLE };
    let old_index = Chunker::new(params).chunk_reader(BufReader::new(std::fs::File::open(old)?))?.index;
    let have: HashSet<_> = old_index.entries().iter().map(|e| e.id).collect();
    let mut seen = HashSet::new();
    let mut chunks = 0u64;
    let new_index = Chunker::new(params)
        .chunk_reader_with(BufReader::new(std::fs::File::open(new)?), |c| {
            if !have.contains(&c.id) && seen.insert(c.id) {
                chunks += flotilla_core::object::encode(c.data, flotilla_core::object::DEFAULT_LEVEL).len() as u64;
            }
            Ok(())
        })?
        .index;

    let patch_path = work.join(format!("{name}.flotilla"));
    let started = Instant::now();
    let stats = {
        let mut out = BufWriter::new(std::fs::File::create(&patch_path)?);
        let stats = delta::encode(
            &std::fs::File::open(old)?,
            &old_index,
            &std::fs::File::open(new)?,
            &new_index,
            &encode_options(),
            &mut out,
            &mut |_, _| {},
        )?;
        out.flush()?;
        stats
    };
    let encode_s = started.elapsed().as_secs_f64();
    let rss_mib = apply_in_child(old, &patch_path, new, work)?;
    if std::env::var_os("FLOTILLA_DELTA_VERBOSE").is_some() {
        print_regions(&patch_path)?;
    }
    let _ = std::fs::remove_file(&patch_path);

    let cache = std::env::var_os("FLOTILLA_DELTA_ANCHOR_CACHE").map(PathBuf::from);
    let key = format!("{}\t{}", old.display(), new.display());
    let (bsdiff, xdelta, zstd, casync) = match cache.as_deref().and_then(|c| cached_anchors(c, &key)) {
        Some([b, x, z, c]) => ((b.0 as u64, b.1), (x.0 as u64, x.1), (z.0 as u64, z.1), c.0 as u64),
        None => {
            let measured = measure_anchors(old, new, new_size, work)?;
            if let Some(cache) = cache {
                let (b, x, z, c) = measured;
                let line = format!("{key}\t{} {} {} {} {} {} {c}\n", b.0, b.1, x.0, x.1, z.0, z.1);
                std::fs::OpenOptions::new().create(true).append(true).open(cache)?.write_all(line.as_bytes())?;
            }
            measured
        }
    };
    Ok(Row {
        new_size,
        flotilla: stats.patch_size.min(chunks),
        patch: stats.patch_size,
        method: format!("{:?}", stats.method).to_lowercase(),
        regions: stats.regions,
        copied: stats.copied_bytes,
        patched: stats.patched_bytes,
        encode_s,
        chunks,
        bsdiff,
        xdelta,
        zstd,
        casync,
        rss_mib,
    })
}

/// The anchor tools on one pair: bsdiff's, xdelta3's and zstd's (bytes, seconds), casync's
/// new-chunk bytes.
fn measure_anchors(
    old: &Path,
    new: &Path,
    new_size: u64,
    work: &Path,
) -> Result<((u64, f64), (u64, f64), (u64, f64), u64)> {
    let bsdiff = if new_size.max(std::fs::metadata(old)?.len()) <= BSDIFF_MAX {
        tool(work, "bsdiff", &[old.as_os_str(), new.as_os_str()], true)?
    } else {
        qbsdiff(old, new)?
    };
    let xdelta = tool(
        work,
        "xdelta3",
        &[
            "-9".as_ref(),
            "-S".as_ref(),
            "djw".as_ref(),
            "-e".as_ref(),
            "-f".as_ref(),
            "-s".as_ref(),
            old.as_os_str(),
            new.as_os_str(),
        ],
        true,
    )?;
    let zstd = zstd_patch(old, new, work)?;
    let casync = casync_new_bytes(old, new, work)?;
    Ok((bsdiff, xdelta, zstd, casync))
}

/// Default encode options, with the fields named by `FLOTILLA_DELTA_*` env vars overridden.
fn encode_options() -> EncodeOptions {
    let var = |name: &str| std::env::var(name).ok().and_then(|v| v.parse::<i64>().ok());
    let mut opts = EncodeOptions::default();
    if let Some(level) = var("FLOTILLA_DELTA_LEVEL") {
        opts.level = level as i32;
    }
    if let Some(max) = var("FLOTILLA_DELTA_BSDIFF_MAX") {
        opts.bsdiff_max = max as u64;
    }
    if let Some(len) = var("FLOTILLA_DELTA_REGION_LEN") {
        opts.region_len = len as u64;
    }
    opts
}

/// (size, seconds) of bsdiff, xdelta3, zstd and (size, 0) of casync kept for `key`.
fn cached_anchors(cache: &Path, key: &str) -> Option<[(f64, f64); 4]> {
    let text = std::fs::read_to_string(cache).ok()?;
    let line = text.lines().rev().find_map(|l| l.strip_prefix(key)?.strip_prefix('\t'))?;
    let v: Vec<f64> = line.split_whitespace().filter_map(|x| x.parse().ok()).collect();
    let [b, bs, x, xs, z, zs, c] = v[..] else { return None };
    Some([(b, bs), (x, xs), (z, zs), (c, 0.0)])
}

/// Prints a patch's region table: one line per region (op, new offset and length, reference
/// extents and bytes, payload bytes or its slice of the shared stream), the shared stream,
/// then the header and table bytes.
fn print_regions(patch: &Path) -> Result<()> {
    let mut file = BufReader::new(std::fs::File::open(patch)?);
    let header = delta::PatchHeader::read(&mut file, &DeltaLimits::default())?;
    let head_len = match (&header.shared, header.regions.first()) {
        (Some(s), _) => s.payload_offset,
        (None, first) => first.map_or(0, |r| r.payload_offset),
    };
    for (i, r) in header.regions.iter().enumerate() {
        let payload = match r.shared {
            Some(slice) => format!("shared {}+{}", slice.offset, slice.len),
            None => format!("payload {:>7}", r.payload_len),
        };
        println!(
            "    region {i:>4} {:<6} new {:>10}+{:<8} extents {:>3} ref {:>8} {payload}",
            format!("{:?}", r.op).to_lowercase(),
            r.new_offset,
            r.new_len,
            r.extents.len(),
            r.reference_len(),
        );
    }
    if let Some(s) = &header.shared {
        let reference: u64 = s.extents.iter().map(|e| e.len).sum();
        println!(
            "    shared stream: {} bytes decoded, payload {}, extents {} ref {reference}",
            s.len,
            s.payload_len,
            s.extents.len()
        );
    }
    println!("    header and table: {head_len} bytes");
    Ok(())
}

/// Runs `program ARGS OUT` (the output file last), returns (output size, seconds).
fn tool(work: &Path, program: &str, args: &[&std::ffi::OsStr], out_last: bool) -> Result<(u64, f64)> {
    let out = work.join(format!("out.{program}"));
    let started = Instant::now();
    let mut cmd = Command::new(program);
    cmd.args(args);
    if out_last {
        cmd.arg(&out);
    }
    let status = cmd.status().map_err(|e| format!("{program}: {e} (install it: apt-get install {program})"))?;
    let secs = started.elapsed().as_secs_f64();
    if !status.success() {
        return Err(format!("{program} failed: {status}").into());
    }
    let size = std::fs::metadata(&out)?.len();
    std::fs::remove_file(&out)?;
    Ok((size, secs))
}

fn zstd_patch(old: &Path, new: &Path, work: &Path) -> Result<(u64, f64)> {
    let out = work.join("out.zst");
    let started = Instant::now();
    let status = Command::new("zstd")
        .args(["-q", "-f", "-19", "--long=27"])
        .arg(format!("--patch-from={}", old.display()))
        .arg(new)
        .arg("-o")
        .arg(&out)
        .status()?;
    let secs = started.elapsed().as_secs_f64();
    if !status.success() {
        return Err(format!("zstd --patch-from failed: {status}").into());
    }
    let size = std::fs::metadata(&out)?.len();
    std::fs::remove_file(&out)?;
    Ok((size, secs))
}

/// qbsdiff (bsdiff 4 format, parallel search) in process.
fn qbsdiff(old: &Path, new: &Path) -> Result<(u64, f64)> {
    let (old, new) = (std::fs::read(old)?, std::fs::read(new)?);
    let started = Instant::now();
    let mut patch = Vec::new();
    qbsdiff::Bsdiff::new(&old, &new)
        .parallel_scheme(qbsdiff::ParallelScheme::Auto)
        .compare(std::io::Cursor::new(&mut patch))?;
    Ok((patch.len() as u64, started.elapsed().as_secs_f64()))
}

/// Bytes of chunk files a `casync make` of `new` adds to a store that holds `old`'s.
fn casync_new_bytes(old: &Path, new: &Path, work: &Path) -> Result<u64> {
    let store = work.join("casync.castr");
    let _ = std::fs::remove_dir_all(&store);
    let make = |input: &Path, index: &str| -> Result<()> {
        let status = Command::new("casync")
            .arg("make")
            .arg(format!("--store={}", store.display()))
            .arg(work.join(index))
            .arg(input)
            .status()?;
        if !status.success() {
            return Err(format!("casync make failed: {status}").into());
        }
        Ok(())
    };
    make(old, "old.caibx")?;
    let before = store_files(&store)?;
    make(new, "new.caibx")?;
    let added =
        store_files(&store)?.into_iter().filter(|(p, _)| !before.iter().any(|(q, _)| q == p)).map(|(_, s)| s).sum();
    let _ = std::fs::remove_dir_all(&store);
    Ok(added)
}

fn store_files(dir: &Path) -> Result<Vec<(PathBuf, u64)>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d)? {
            let e = e?;
            let meta = e.metadata()?;
            if meta.is_dir() {
                stack.push(e.path());
            } else {
                out.push((e.path(), meta.len()));
            }
        }
    }
    Ok(out)
}

/// Applies the patch in a child process, checks the output, returns the child's VmHWM in MiB.
fn apply_in_child(old: &Path, patch: &Path, new: &Path, work: &Path) -> Result<f64> {
    let out = work.join("applied");
    let exe = std::env::current_exe()?;
    let spec = format!("{}\t{}\t{}", old.display(), patch.display(), out.display());
    let output = Command::new(exe).env(CHILD_ENV, spec).output()?;
    if !output.status.success() {
        return Err(format!("applying the patch failed: {}", String::from_utf8_lossy(&output.stderr)).into());
    }
    if sha256_file(&out)? != sha256_file(new)? {
        return Err("the applied patch does not reproduce the new image".into());
    }
    std::fs::remove_file(&out)?;
    let kib: f64 = String::from_utf8_lossy(&output.stdout).trim().parse()?;
    Ok(kib / 1024.0)
}

fn sha256_file(path: &Path) -> Result<Vec<u8>> {
    use sha2::Digest as _;
    let mut hasher = sha2::Sha256::new();
    let mut file = std::fs::File::open(path)?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher.finalize().to_vec())
}

/// Child mode: apply like the agent (streaming from the patch file into an output file), then
/// print VmHWM in KiB.
fn child_apply(spec: &str) -> Result<()> {
    let parts: Vec<&str> = spec.split('\t').collect();
    let [old, patch, out] = parts[..] else { return Err("bad child spec".into()) };
    let old = std::fs::File::open(old)?;
    let mut patch = BufReader::with_capacity(64 << 10, std::fs::File::open(patch)?);
    let mut out = std::fs::File::create(out)?;
    delta::apply(&mut patch, &old, &mut out, &DeltaLimits::default())?;
    out.sync_all()?;
    let status = std::fs::read_to_string("/proc/self/status")?;
    let hwm = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .ok_or("no VmHWM in /proc/self/status")?;
    println!("{hwm}");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The default corpus.

/// Consecutive releases of public npm packages: (package, old version, new version).
const JS_BUNDLE: (&str, &str, &str) = ("@babel/standalone", "7.24.0", "7.24.1");
const APP_TREE: (&str, &str, &str) = ("typescript", "5.4.4", "5.4.5");
const IMAGE_CONTENT: [(&str, &str, &str); 4] = [
    ("typescript", "5.4.4", "5.4.5"),
    ("@babel/standalone", "7.24.0", "7.24.1"),
    ("echarts", "5.5.0", "5.5.1"),
    ("three", "0.164.0", "0.164.1"),
];
const IMAGE_SIZE: &str = "256M";

fn corpus_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..").join("target"), PathBuf::from);
    target.join("delta-corpus")
}

fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().map_err(|e| format!("{cmd:?}: {e}"))?;
    if !status.success() {
        return Err(format!("{cmd:?} failed: {status}").into());
    }
    Ok(())
}

/// `npm pack` of one version, unpacked; returns the package directory.
fn fetch(dir: &Path, package: &str, version: &str) -> Result<PathBuf> {
    let slug = format!("{}-{version}", package.trim_start_matches('@').replace('/', "-"));
    let unpacked = dir.join("npm").join(&slug);
    if unpacked.join("package").is_dir() {
        return Ok(unpacked.join("package"));
    }
    let tgz_dir = dir.join("npm-tgz");
    std::fs::create_dir_all(&tgz_dir)?;
    run(Command::new("npm").args(["pack", "--silent", &format!("{package}@{version}")]).current_dir(&tgz_dir))?;
    let tgz = tgz_dir.join(format!("{slug}.tgz"));
    let staging = dir.join("npm").join(format!("{slug}.partial"));
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging)?;
    run(Command::new("tar").arg("xzf").arg(&tgz).arg("-C").arg(&staging))?;
    std::fs::rename(&staging, &unpacked)?;
    Ok(unpacked.join("package"))
}

fn build_corpus() -> Result<Vec<(String, PathBuf, PathBuf)>> {
    let dir = corpus_dir();
    std::fs::create_dir_all(&dir)?;
    let mut pairs = Vec::new();

    let (pkg, a, b) = JS_BUNDLE;
    let (old, new) = (dir.join("babel.min.js.old"), dir.join("babel.min.js"));
    if !new.is_file() {
        std::fs::copy(fetch(&dir, pkg, a)?.join("babel.min.js"), &old)?;
        std::fs::copy(fetch(&dir, pkg, b)?.join("babel.min.js"), &new)?;
    }
    pairs.push(("babel.min.js".to_owned(), old, new));

    let (pkg, a, b) = APP_TREE;
    let (old, new) = (dir.join("typescript-app.tar.old"), dir.join("typescript-app.tar"));
    if !new.is_file() {
        for (v, out) in [(a, &old), (b, &new)] {
            let tree = fetch(&dir, pkg, v)?;
            flotilla_core::archive::pack_dir(&tree, BufWriter::new(std::fs::File::create(out)?))?;
        }
    }
    pairs.push(("typescript-app.tar".to_owned(), old, new));

    let (old, new) = (dir.join("rootfs.img.old"), dir.join("rootfs.img"));
    if !new.is_file() {
        for (which, out) in [(0, &old), (1, &new)] {
            let root = dir.join(format!("rootfs-{which}"));
            let _ = std::fs::remove_dir_all(&root);
            for (pkg, a, b) in IMAGE_CONTENT {
                let src = fetch(&dir, pkg, if which == 0 { a } else { b })?;
                let dst = root.join("usr/lib/node_modules").join(pkg);
                std::fs::create_dir_all(dst.parent().ok_or("path")?)?;
                run(Command::new("cp").arg("-a").arg(&src).arg(&dst))?;
            }
            let partial = out.with_extension("partial");
            let _ = std::fs::remove_file(&partial);
            run(Command::new("truncate").args(["-s", IMAGE_SIZE]).arg(&partial))?;
            // Fixed UUID, hash seed and clock: two builds differ only by their content, as
            // from a reproducible image build.
            run(Command::new("mkfs.ext4")
                .env("E2FSPROGS_FAKE_TIME", "1700000000")
                .args([
                    "-q",
                    "-F",
                    "-b",
                    "4096",
                    "-U",
                    "2f4c8a7e-5b1d-4c3e-9a6f-0e1d2c3b4a59",
                    "-E",
                    "hash_seed=7d3e2a1b-6c5f-4e8d-9b0a-1f2e3d4c5b6a,root_owner=0:0",
                    "-d",
                ])
                .arg(&root)
                .arg(&partial))?;
            std::fs::rename(&partial, out)?;
            std::fs::remove_dir_all(&root)?;
        }
    }
    pairs.push(("rootfs.img".to_owned(), old, new));
    Ok(pairs)
}
