//! The core demo that `scripts/quickstart.sh` runs: one release and one update, end to end,
//! with flotilla-core alone.
//!
//! 1. generate a sample image (deterministic, compressible in parts, with repeated extents);
//! 2. chunk and hash it (streaming FastCDC, BLAKE3 ids, whole-image SHA-256 and BLAKE3);
//! 3. store the chunk index and the chunk objects (zstd or raw) in a store directory;
//! 4. create a fresh trust root (root, release and rollout keys);
//! 5. sign release 1.0.0 and verify it as a device would, including two refused tamperings;
//! 6. edit about 1 % of the image (overwrites, insertions, deletions) and publish 1.1.0,
//!    storing only the chunks the store lacks;
//! 7. verify 1.1.0 as the device that runs 1.0.0, then rebuild the image from the store,
//!    checking every chunk object against its id and the result against the manifest's SHA-256.
//!
//! ```text
//! cargo run --release -p flotilla-core --example demo -- [--size-mib 64] [--change-percent 1]
//!     [--seed 1] [--keep DIR]
//! ```
//! MB/s figures are 10^6 bytes a second of image.

use std::collections::HashSet;
use std::fs::{self, File};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use flotilla_core::chunking::{ChunkParams, ChunkedImage, Chunker};
use flotilla_core::ids::{ChunkId, Sha256Digest};
use flotilla_core::keys::{Algorithm, SigningKey};
use flotilla_core::manifest::{
    self, Compatibility, DeviceContext, IndexRef, Manifest, ManifestError, Payload, PayloadKind, VerifiedManifest,
};
use flotilla_core::object;
use flotilla_core::time::Timestamp;
use flotilla_core::trust::{RootDocument, TrustRoot};
use sha2::Digest;

#[path = "../benches/support/sample_image.rs"]
mod sample_image;

type Res<T = ()> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

const PRODUCT: &str = "demo-board";
const CHANNEL: &str = "stable";
const HARDWARE: &str = "rpi4";
/// How long the demo's manifests stay valid.
const MANIFEST_LIFETIME: Duration = Duration::from_secs(30 * 24 * 3600);
/// How long the demo's trust root stays valid.
const ROOT_LIFETIME: Duration = Duration::from_secs(365 * 24 * 3600);

const USAGE: &str = "\
usage: demo [--size-mib N] [--change-percent P] [--seed S] [--keep DIR]

  --size-mib N        size of the sample image in MiB (default 64)
  --change-percent P  share of the image the update edits (default 1)
  --seed S            seed of the sample image (default 1)
  --keep DIR          build the store in DIR and keep it (default: a temporary directory)";

#[derive(Debug)]
struct Args {
    size_mib: u64,
    change_percent: f64,
    seed: u64,
    keep: Option<PathBuf>,
}

fn parse_args() -> Res<Args> {
    let mut args = Args { size_mib: 64, change_percent: 1.0, seed: 1, keep: None };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "-h" || flag == "--help" {
            println!("{USAGE}");
            std::process::exit(0);
        }
        let value = it.next().ok_or_else(|| format!("{flag} needs a value\n{USAGE}"))?;
        let bad = |e: &dyn std::fmt::Display| format!("{flag} {value}: {e}");
        match flag.as_str() {
            "--size-mib" => args.size_mib = value.parse().map_err(|e| bad(&e))?,
            "--change-percent" => args.change_percent = value.parse().map_err(|e| bad(&e))?,
            "--seed" => args.seed = value.parse().map_err(|e| bad(&e))?,
            "--keep" => args.keep = Some(value.into()),
            _ => return Err(format!("unknown argument {flag}\n{USAGE}").into()),
        }
    }
    if !(1..=64 << 10).contains(&args.size_mib) {
        return Err("--size-mib must be between 1 and 65536".into());
    }
    if !(args.change_percent > 0.0 && args.change_percent <= 50.0) {
        return Err("--change-percent must be in (0, 50]".into());
    }
    Ok(args)
}

fn main() {
    if let Err(e) = parse_args().and_then(run) {
        eprintln!("demo failed: {e}");
        let mut source = e.source();
        while let Some(s) = source {
            eprintln!("  caused by: {s}");
            source = s.source();
        }
        std::process::exit(1);
    }
}

fn mb_s(bytes: u64, elapsed: Duration) -> f64 {
    bytes as f64 / 1e6 / elapsed.as_secs_f64().max(1e-9)
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / f64::from(1u32 << 20)
}

/// A chunk store laid out as a CDN bucket would be: `index/<id>`, `chunks/<id[..2]>/<id>`.
#[derive(Debug)]
struct Store {
    dir: PathBuf,
}

impl Store {
    fn new(dir: &Path) -> io::Result<Self> {
        fs::create_dir_all(dir.join("chunks"))?;
        fs::create_dir_all(dir.join("index"))?;
        fs::create_dir_all(dir.join("manifests"))?;
        Ok(Self { dir: dir.to_owned() })
    }

    fn chunk_path(&self, id: &ChunkId) -> PathBuf {
        let hex = id.to_hex();
        self.dir.join("chunks").join(&hex[..2]).join(hex)
    }

    fn put_chunk(&self, id: &ChunkId, object: &[u8]) -> io::Result<()> {
        let path = self.chunk_path(id);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent)?;
        }
        fs::write(path, object)
    }

    /// Reads a chunk object, refusing to read more than a valid object can be.
    fn get_chunk(&self, id: &ChunkId, len: u32, buf: &mut Vec<u8>) -> io::Result<()> {
        buf.clear();
        File::open(self.chunk_path(id))?.take(object::max_object_len(len) + 1).read_to_end(buf)?;
        Ok(())
    }
}

/// What publishing one image into the store did.
#[derive(Debug)]
struct Published {
    chunked: ChunkedImage,
    index_bytes: Vec<u8>,
    new_chunks: u64,
    new_bytes: u64,
    stored_bytes: u64,
    elapsed: Duration,
}

/// Chunks `image`, compresses and stores every chunk not in `known`, and stores the index.
fn publish(store: &Store, image: &Path, params: ChunkParams, known: &mut HashSet<ChunkId>) -> Res<Published> {
    let (mut new_chunks, mut new_bytes, mut stored_bytes) = (0u64, 0u64, 0u64);
    let start = Instant::now();
    let chunked = Chunker::new(params).chunk_reader_with(File::open(image)?, |chunk| {
        if known.insert(chunk.id) {
            let obj = object::encode(chunk.data, object::DEFAULT_LEVEL);
            store.put_chunk(&chunk.id, &obj)?;
            new_chunks += 1;
            new_bytes += chunk.data.len() as u64;
            stored_bytes += obj.len() as u64;
        }
        Ok(())
    })?;
    let index_bytes = chunked.index.encode();
    fs::write(store.dir.join("index").join(chunked.index.id().to_hex()), &index_bytes)?;
    Ok(Published { chunked, index_bytes, new_chunks, new_bytes, stored_bytes, elapsed: start.elapsed() })
}

fn manifest_for(p: &Published, version: &str, version_code: u64, params: ChunkParams) -> Res<Manifest> {
    let now = Timestamp::now();
    Ok(Manifest {
        schema_version: manifest::MANIFEST_SCHEMA_VERSION,
        product: PRODUCT.into(),
        channel: CHANNEL.into(),
        version: version.parse()?,
        version_code,
        security_version: 1,
        payload: Payload {
            kind: PayloadKind::Raw,
            size: p.chunked.index.image_size(),
            sha256: p.chunked.sha256,
            blake3: p.chunked.blake3,
        },
        chunking: params,
        index: IndexRef { id: p.chunked.index.id(), size: p.index_bytes.len() as u64 },
        deltas: Vec::new(),
        compatibility: Compatibility { hardware: vec![HARDWARE.into()], ..Default::default() },
        mandatory: false,
        created_at: now,
        expires_at: now.saturating_add(MANIFEST_LIFETIME),
        notes: Some(format!("demo release {version}")),
    })
}

/// One edit of the update: at `offset` of the old image, drop `delete` bytes, write `insert`.
#[derive(Debug)]
struct Edit {
    offset: u64,
    delete: u64,
    insert: Vec<u8>,
}

/// About `percent` % of the image, in 24 edits spread across it: overwrites, insertions
/// (which shift everything after them, the case fixed-size blocks handle badly) and deletions.
fn plan_edits(size: u64, percent: f64, seed: u64) -> Vec<Edit> {
    const EDITS: u64 = 24;
    let per_edit = ((size as f64 * percent / 100.0) / EDITS as f64).max(1.0) as u64;
    let mut rng = seed ^ 0xa076_1d64_78bd_642f;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let stride = size / EDITS;
    (0..EDITS)
        .map(|i| {
            let offset = (i * stride + next() % stride.saturating_sub(per_edit).max(1)).min(size);
            let mut bytes = |n: u64| (0..n).map(|_| (next() >> 24) as u8).collect::<Vec<u8>>();
            match i % 3 {
                0 => Edit { offset, delete: per_edit.min(size - offset), insert: bytes(per_edit) },
                1 => Edit { offset, delete: 0, insert: bytes(per_edit) },
                _ => Edit { offset, delete: per_edit.min(size - offset), insert: Vec::new() },
            }
        })
        .collect()
}

/// Writes `old` with `edits` (sorted by offset, not overlapping) applied to `new`, streaming.
fn apply_edits(old: &Path, new: &Path, edits: &[Edit]) -> io::Result<u64> {
    let mut src = BufReader::with_capacity(1 << 20, File::open(old)?);
    let mut dst = BufWriter::with_capacity(1 << 20, File::create(new)?);
    let mut pos = 0u64;
    for e in edits {
        io::copy(&mut (&mut src).take(e.offset.saturating_sub(pos)), &mut dst)?;
        io::copy(&mut (&mut src).take(e.delete), &mut io::sink())?;
        dst.write_all(&e.insert)?;
        pos = pos.max(e.offset) + e.delete;
    }
    io::copy(&mut src, &mut dst)?;
    dst.flush()?;
    Ok(dst.get_ref().metadata()?.len())
}

/// Rebuilds an image from the store as an agent would: fetch the index named by the verified
/// manifest, check it, then fetch, decode (bounded) and verify every chunk, hashing as it goes.
fn reassemble(store: &Store, verified: &VerifiedManifest, out: &Path) -> Res<Sha256Digest> {
    let m = verified.manifest();
    let mut index_bytes = Vec::new();
    File::open(store.dir.join("index").join(m.index.id.to_hex()))?
        .take(m.index.size + 1)
        .read_to_end(&mut index_bytes)?;
    let index = verified.check_index(&index_bytes)?;
    let mut sha = sha2::Sha256::new();
    let mut dst = BufWriter::with_capacity(1 << 20, File::create(out)?);
    let (mut obj, mut chunk) = (Vec::new(), Vec::new());
    for entry in index.entries() {
        store.get_chunk(&entry.id, entry.len, &mut obj)?;
        object::decode_into(&obj, &entry.id, entry.len, &mut chunk)?;
        sha.update(&chunk);
        dst.write_all(&chunk)?;
    }
    dst.flush()?;
    Ok(Sha256Digest::from_bytes(sha.finalize().into()))
}

fn run(args: Args) -> Res {
    let params = ChunkParams::IMAGE;
    let temp;
    let root_dir = match &args.keep {
        Some(dir) => {
            fs::create_dir_all(dir)?;
            dir.clone()
        }
        None => {
            temp = tempfile::Builder::new().prefix("flotilla-demo-").tempdir()?;
            temp.path().to_owned()
        }
    };
    let store = Store::new(&root_dir.join("store"))?;
    let (v1_path, v2_path, out_path) =
        (root_dir.join("image-1.0.0.img"), root_dir.join("image-1.1.0.img"), root_dir.join("rebuilt-1.1.0.img"));
    println!("Flotilla core demo, working in {}", root_dir.display());
    println!(
        "chunking parameters: min {} KiB, avg {} KiB, max {} KiB (FastCDC v2020)",
        params.min >> 10,
        params.avg >> 10,
        params.max >> 10
    );

    // 1. Sample image.
    let size = args.size_mib << 20;
    let start = Instant::now();
    let written = io::copy(
        &mut sample_image::SampleImage::new(args.seed, size),
        &mut BufWriter::with_capacity(1 << 20, File::create(&v1_path)?),
    )?;
    println!(
        "\n[1/7] generated a {:.0} MiB sample image (seed {}) in {:.2} s",
        mib(written),
        args.seed,
        start.elapsed().as_secs_f64()
    );

    // 2. Chunk and hash, nothing else, to show what the chunker alone does.
    let start = Instant::now();
    let plain = Chunker::new(params).chunk_reader(File::open(&v1_path)?)?;
    let elapsed = start.elapsed();
    let index = &plain.index;
    let unique: HashSet<ChunkId> = index.entries().iter().map(|e| e.id).collect();
    println!(
        "[2/7] chunked and hashed in {:.3} s: {:.0} MB/s with {} threads",
        elapsed.as_secs_f64(),
        mb_s(size, elapsed),
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    println!(
        "      {} chunks (average {:.1} KiB), {} distinct; image sha256 {}",
        index.len(),
        size as f64 / index.len().max(1) as f64 / 1024.0,
        unique.len(),
        plain.sha256
    );

    // 3. Store index and objects.
    let mut known = HashSet::new();
    let v1 = publish(&store, &v1_path, params, &mut known)?;
    if v1.chunked != plain {
        return Err("chunking the same image twice gave two different results".into());
    }
    println!(
        "[3/7] stored {} chunk objects ({:.1} MiB of chunks as {:.1} MiB of objects, {:.2}x) and a {} KiB index in {:.3} s ({:.0} MB/s with zstd)",
        v1.new_chunks,
        mib(v1.new_bytes),
        mib(v1.stored_bytes),
        v1.new_bytes as f64 / v1.stored_bytes.max(1) as f64,
        v1.index_bytes.len() >> 10,
        v1.elapsed.as_secs_f64(),
        mb_s(size, v1.elapsed)
    );
    println!("      index {}", v1.chunked.index.id());

    // 4. Trust root.
    let root_key = SigningKey::generate(Algorithm::Ed25519)?;
    let release_key = SigningKey::generate(Algorithm::Ed25519)?;
    let rollout_key = SigningKey::generate(Algorithm::Ed25519)?;
    let doc = RootDocument::new(
        1,
        Timestamp::now().saturating_add(ROOT_LIFETIME),
        (&[root_key.public_key()], 1),
        (&[release_key.public_key()], 1),
        (&[rollout_key.public_key()], 1),
    );
    let root_json = doc.sign(&[&root_key])?.to_json();
    fs::write(store.dir.join("root.json"), &root_json)?;
    // The device is provisioned with these bytes and loads them as its trusted root.
    let root = TrustRoot::from_trusted_json(&root_json)?;
    println!(
        "[4/7] created trust root v{} (expires {}): root key {}…, release key {}…, rollout key {}… (Ed25519)",
        root.version(),
        root.expires_at(),
        &root_key.public_key().key_id().to_hex()[..12],
        &release_key.public_key().key_id().to_hex()[..12],
        &rollout_key.public_key().key_id().to_hex()[..12],
    );

    // 5. Sign 1.0.0 and verify it on a fresh device.
    let m1 = manifest_for(&v1, "1.0.0", 1, params)?;
    let env1 = m1.sign(&[&release_key])?.to_json();
    fs::write(store.dir.join("manifests").join("1.json"), &env1)?;
    let mut device = DeviceContext::new(PRODUCT, CHANNEL, Timestamp::now());
    device.hardware = Some(HARDWARE.into());
    let start = Instant::now();
    let verified1 = manifest::verify_for_device(&env1, &root, &device)?;
    verified1.check_index(&v1.index_bytes)?;
    println!(
        "[5/7] signed release 1.0.0 (version_code 1); a fresh {HARDWARE} device verified signature, expiry, product, channel, hardware and index in {:.2} ms",
        start.elapsed().as_secs_f64() * 1e3
    );
    expect_refusal("a payload edited after signing", tampered(&env1)?, &root, &device, |e| {
        matches!(e, ManifestError::Signature(_))
    })?;
    let mut other = device.clone();
    other.channel = "beta".into();
    expect_refusal("the same manifest on a beta-channel device", env1.clone(), &root, &other, |e| {
        matches!(e, ManifestError::WrongChannel { .. })
    })?;

    // 6. The update: edit about 1 %, re-chunk, store only what is new.
    let edits = plan_edits(size, args.change_percent, args.seed);
    let edited: u64 = edits.iter().map(|e| e.delete.max(e.insert.len() as u64)).sum();
    let v2_size = apply_edits(&v1_path, &v2_path, &edits)?;
    let v2 = publish(&store, &v2_path, params, &mut known)?;
    let entries = v2.chunked.index.entries();
    let (reused, reused_bytes) =
        entries.iter().filter(|e| unique.contains(&e.id)).fold((0u64, 0u64), |(n, b), e| (n + 1, b + u64::from(e.len)));
    println!(
        "[6/7] update 1.1.0: {} edits ({} each of overwrites, insertions and deletions) touching {:.2} MiB ({:.2} %), new image {:.1} MiB",
        edits.len(),
        edits.len() / 3,
        mib(edited),
        edited as f64 * 100.0 / size as f64,
        mib(v2_size)
    );
    println!(
        "      re-chunked in {:.3} s ({:.0} MB/s with zstd): {} chunks, {} reused ({:.1} MiB, {:.1} % of the image), {} new",
        v2.elapsed.as_secs_f64(),
        mb_s(v2_size, v2.elapsed),
        entries.len(),
        reused,
        mib(reused_bytes),
        reused_bytes as f64 * 100.0 / v2_size as f64,
        v2.new_chunks
    );
    println!(
        "      a device on 1.0.0 fetches {:.2} MiB of chunks ({:.2} MiB as objects) + a {} KiB index instead of {:.1} MiB",
        mib(v2.new_bytes),
        mib(v2.stored_bytes),
        v2.index_bytes.len() >> 10,
        mib(v2_size)
    );

    // 7. Verify 1.1.0 on the device that runs 1.0.0, then rebuild it from the store.
    let m2 = manifest_for(&v2, "1.1.0", 2, params)?;
    let env2 = m2.sign(&[&release_key])?.to_json();
    fs::write(store.dir.join("manifests").join("2.json"), &env2)?;
    device.installed_version_code = Some(1);
    device.security_floor = 1;
    let verified2 = manifest::verify_for_device(&env2, &root, &device)?;
    let mut updated = device.clone();
    updated.installed_version_code = Some(2);
    expect_refusal("release 1.1.0 replayed to a device already on it", env2.clone(), &root, &updated, |e| {
        matches!(e, ManifestError::NotNewer { .. })
    })?;
    let start = Instant::now();
    let rebuilt = reassemble(&store, &verified2, &out_path)?;
    let elapsed = start.elapsed();
    if rebuilt != verified2.manifest().payload.sha256 {
        return Err(format!(
            "rebuilt image has sha256 {rebuilt}, the manifest says {}",
            verified2.manifest().payload.sha256
        )
        .into());
    }
    println!(
        "[7/7] verified 1.1.0 on the 1.0.0 device, rebuilt it from {} verified chunk objects in {:.3} s ({:.0} MB/s)",
        entries.len(),
        elapsed.as_secs_f64(),
        mb_s(v2_size, elapsed)
    );
    println!("      sha256 {rebuilt} matches the signed manifest");
    println!(
        "\nok: {:.0} MiB image, {:.1} % of its bytes reused by the update, every check passed{}",
        mib(size),
        reused_bytes as f64 * 100.0 / v2_size as f64,
        match &args.keep {
            Some(dir) => format!("; store kept in {}", dir.display()),
            None => String::new(),
        }
    );
    Ok(())
}

/// The envelope with one character of its payload changed (the signature is left as it was).
fn tampered(envelope_json: &[u8]) -> Res<Vec<u8>> {
    let mut env = flotilla_core::dsse::Envelope::from_json(envelope_json)?;
    let at = env.payload.iter().position(|&b| b == b'1').ok_or("payload has no digit to change")?;
    env.payload[at] = b'2';
    Ok(env.to_json())
}

fn expect_refusal(
    what: &str,
    envelope_json: Vec<u8>,
    root: &TrustRoot,
    device: &DeviceContext,
    expected: impl Fn(&ManifestError) -> bool,
) -> Res {
    match manifest::verify_for_device(&envelope_json, root, device) {
        Err(e) if expected(&e) => {
            println!("      refused {what}: {e}");
            Ok(())
        }
        Err(e) => Err(format!("{what} was refused for the wrong reason: {e}").into()),
        Ok(_) => Err(format!("{what} was accepted").into()),
    }
}
