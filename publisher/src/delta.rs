//! Patches: `flotilla release` builds them from earlier releases of the channel, `flotilla
//! patch` adds one to a published release (re-signing its manifest with one more delta).
//!
//! For each base release: get its image (a local `--delta-base` file whose SHA-256 matches,
//! else downloaded chunk by chunk from the coordinator and checked), encode a patch
//! ([`flotilla_core::delta::encode`]) into a temporary file, and keep it only when it beats
//! chunk reuse (the new chunks the base lacks, uncompressed bytes) by `--delta-min-saving`.
//! A kept patch is chunked with the release's parameters, its missing chunks and its index
//! are uploaded like a release's, and it is listed in the manifest as a [`Delta`].

use std::collections::HashSet;
use std::io::{BufWriter, Read as _};
use std::path::{Path, PathBuf};
use std::time::Instant;

use clap::Args;
use flotilla_core::chunking::{ChunkedImage, Chunker};
use flotilla_core::delta::{DEFAULT_MAX_WINDOW, EncodeOptions};
use flotilla_core::ids::Sha256Digest;
use flotilla_core::index::ChunkIndex;
use flotilla_core::manifest::{Delta, DeltaMethod, IndexRef, MAX_DELTAS};
use serde_json::{Value, json};
use sha2::Digest as _;

use crate::client::Client;
use crate::error::{CliError, CliResult, Kind, io_err};
use crate::release::{missing_ids, progress, upload_chunks};

/// How patches are built and judged (shared by `release` and `patch`).
#[derive(Debug, Clone, Args)]
pub struct DeltaTuning {
    /// Keep a patch only when it is at least this many percent smaller than the new chunks
    /// it replaces.
    #[arg(long, default_value_t = 20.0, value_name = "PERCENT")]
    pub delta_min_saving: f64,
    /// Largest window in bytes a patch region may need on a device (agents refuse larger).
    #[arg(long, default_value_t = DEFAULT_MAX_WINDOW, value_name = "BYTES")]
    pub delta_window: u64,
    /// zstd level of patch regions.
    #[arg(long, default_value_t = 19)]
    pub delta_level: i32,
    /// Local copies of earlier releases' images (matched by SHA-256) instead of downloading
    /// them. Repeatable.
    #[arg(long = "delta-base", value_name = "FILE")]
    pub delta_base: Vec<PathBuf>,
}

/// Patch options of `flotilla release`.
#[derive(Debug, Clone, Args)]
pub struct DeltaArgs {
    /// Build a patch from this earlier version of the channel. Repeatable; default: the
    /// last `--delta-count` releases.
    #[arg(long = "delta-from", value_name = "VERSION")]
    pub from: Vec<String>,
    /// How many earlier releases get a patch when `--delta-from` is not given.
    #[arg(long, default_value_t = 3)]
    pub delta_count: usize,
    /// Build no patches.
    #[arg(long, conflicts_with = "from")]
    pub no_deltas: bool,
    /// Tuning.
    #[command(flatten)]
    pub tuning: DeltaTuning,
}

/// `flotilla patch`.
#[derive(Debug, Clone, Args)]
pub struct PatchArgs {
    /// Product.
    #[arg(long)]
    pub product: String,
    /// Channel.
    #[arg(long, default_value = "production")]
    pub channel: String,
    /// The release the patch starts from.
    #[arg(long, value_name = "VERSION")]
    pub from: String,
    /// The release that gets the patch (its manifest is re-signed with one more delta).
    #[arg(long, value_name = "VERSION")]
    pub to: String,
    /// A local copy of the `--to` image (checked by SHA-256) instead of downloading it.
    #[arg(long, value_name = "FILE")]
    pub image: Option<PathBuf>,
    /// Signing keys (the release role). Repeatable; default ~/.config/flotilla/keys/release.pem.
    #[arg(long = "key")]
    pub keys: Vec<PathBuf>,
    /// Tuning.
    #[command(flatten)]
    pub tuning: DeltaTuning,
}

/// An earlier release of the channel, as the coordinator lists it.
#[derive(Debug, Clone)]
struct Base {
    id: i64,
    version: String,
    version_code: u64,
    sha256: String,
}

async fn channel_releases(client: &Client, product: &str, channel: &str) -> CliResult<Vec<Base>> {
    let v = client
        .get(&format!("/v1/releases?product={product}&channel={channel}&include_archived=true&limit=1000"))
        .await?;
    Ok(v["releases"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| {
            Some(Base {
                id: r["id"].as_i64()?,
                version: r["version"].as_str()?.to_owned(),
                version_code: r["version_code"].as_u64()?,
                sha256: r["image_sha256"].as_str()?.to_owned(),
            })
        })
        .collect())
}

/// The new image a patch leads to.
#[derive(Debug, Clone, Copy)]
pub struct Target<'a> {
    /// Its file.
    pub path: &'a Path,
    /// Its chunk index.
    pub index: &'a ChunkIndex,
    /// Its SHA-256.
    pub sha256: Sha256Digest,
}

/// Patches for a new release: from `--delta-from` versions or the last `--delta-count`
/// releases below `version_code`. Returns the deltas to list and a JSON report per base.
///
/// # Errors
/// A named `--delta-from` version that does not exist; download, encode or upload failures.
pub async fn for_release(
    client: &Client,
    product: &str,
    channel: &str,
    version_code: u64,
    target: Target<'_>,
    args: &DeltaArgs,
    quiet: bool,
) -> CliResult<(Vec<Delta>, Vec<Value>)> {
    if args.no_deltas {
        return Ok((Vec::new(), Vec::new()));
    }
    let mut releases = channel_releases(client, product, channel).await?;
    releases.retain(|r| r.version_code < version_code);
    releases.sort_by_key(|r| std::cmp::Reverse(r.version_code));
    let bases: Vec<Base> = if args.from.is_empty() {
        let mut seen = HashSet::new();
        releases
            .into_iter()
            .filter(|r| r.sha256 != target.sha256.to_hex() && seen.insert(r.sha256.clone()))
            .take(args.delta_count.min(MAX_DELTAS))
            .collect()
    } else {
        let mut out = Vec::new();
        for v in &args.from {
            let found = releases.iter().find(|r| &r.version == v).ok_or_else(|| {
                CliError::usage(format!("--delta-from {v}: no earlier release {v} on {product}/{channel}"))
            })?;
            out.push(found.clone());
        }
        if out.len() > MAX_DELTAS {
            return Err(CliError::usage(format!("at most {MAX_DELTAS} --delta-from versions")));
        }
        out
    };
    let work = tempfile::tempdir().map_err(|e| CliError::failure(format!("temp dir: {e}")))?;
    let locals = hash_locals(&args.tuning.delta_base).await?;
    let mut deltas = Vec::new();
    let mut report = Vec::new();
    for base in &bases {
        let (delta, v) = build(client, base, target, &args.tuning, &locals, work.path(), quiet).await?;
        deltas.extend(delta);
        report.push(v);
    }
    Ok((deltas, report))
}

/// SHA-256 of each local base file.
async fn hash_locals(paths: &[PathBuf]) -> CliResult<Vec<(PathBuf, String)>> {
    let paths = paths.to_vec();
    tokio::task::spawn_blocking(move || {
        paths
            .into_iter()
            .map(|p| {
                let mut file = std::fs::File::open(&p).map_err(io_err(&p))?;
                let mut hasher = sha2::Sha256::new();
                let mut buf = vec![0u8; 1 << 20];
                loop {
                    let n = file.read(&mut buf).map_err(io_err(&p))?;
                    if n == 0 {
                        break;
                    }
                    hasher.update(&buf[..n]);
                }
                Ok((p, hex_of(&hasher.finalize())))
            })
            .collect()
    })
    .await
    .map_err(|e| CliError::failure(e.to_string()))?
}

fn hex_of(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The base's chunk index, from the coordinator.
async fn fetch_index(client: &Client, base: &Base) -> CliResult<ChunkIndex> {
    let release = client.get(&format!("/v1/releases/{}", base.id)).await?;
    let (_, manifest) = crate::ops::manifest_of(&release)?;
    let bytes = client.get_bytes(&format!("/v1/indexes/{}", manifest.index.id)).await?;
    ChunkIndex::decode(&bytes).map_err(|e| CliError::new(Kind::Verify, format!("index of {}: {e}", base.version)))
}

/// Writes the base's image to `out` from its chunks and checks its SHA-256.
async fn download_image(client: &Client, base: &Base, index: &ChunkIndex, out: &Path, quiet: bool) -> CliResult<()> {
    use std::io::Write as _;
    let file = std::fs::File::create(out).map_err(io_err(out))?;
    let mut w = BufWriter::with_capacity(1 << 20, file);
    let mut hasher = sha2::Sha256::new();
    let pb = progress(index.image_size(), &format!("base {}", base.version), quiet);
    for e in index.entries() {
        let object = client.get_bytes(&format!("/v1/chunks/{}", e.id)).await?;
        let data = flotilla_core::object::decode(&object, &e.id, e.len)
            .map_err(|err| CliError::new(Kind::Verify, format!("chunk {} from the coordinator: {err}", e.id)))?;
        hasher.update(&data);
        w.write_all(&data).map_err(io_err(out))?;
        pb.inc(u64::from(e.len));
    }
    w.flush().map_err(io_err(out))?;
    pb.finish_and_clear();
    let actual = hex_of(&hasher.finalize());
    if actual != base.sha256 {
        return Err(CliError::new(
            Kind::Verify,
            format!("release {} reassembled to SHA-256 {actual}, its manifest says {}", base.version, base.sha256),
        ));
    }
    Ok(())
}

/// Builds, judges and (when kept) uploads one patch from `base` to `target`.
async fn build(
    client: &Client,
    base: &Base,
    target: Target<'_>,
    tuning: &DeltaTuning,
    locals: &[(PathBuf, String)],
    work: &Path,
    quiet: bool,
) -> CliResult<(Option<Delta>, Value)> {
    let old_index = fetch_index(client, base).await?;
    let (old_path, source) = match locals.iter().find(|(_, sha)| *sha == base.sha256) {
        Some((p, _)) => (p.clone(), "local"),
        None => {
            let p = work.join(format!("base-{}.img", base.version_code));
            download_image(client, base, &old_index, &p, quiet).await?;
            (p, "downloaded")
        }
    };
    let have: HashSet<_> = old_index.entries().iter().map(|e| e.id).collect();
    let mut seen = HashSet::new();
    let chunk_bytes: u64 = target
        .index
        .entries()
        .iter()
        .filter(|e| !have.contains(&e.id) && seen.insert(e.id))
        .map(|e| u64::from(e.len))
        .sum();

    let patch_path = work.join(format!("patch-{}.bin", base.version_code));
    let pb = progress(target.index.image_size(), &format!("patch {}", base.version), quiet);
    let (bar, new_path, new_index, patch_out) =
        (pb.clone(), target.path.to_path_buf(), target.index.clone(), patch_path.clone());
    let mut opts = EncodeOptions::default();
    opts.window = tuning.delta_window;
    opts.level = tuning.delta_level;
    let started = Instant::now();
    let stats = tokio::task::spawn_blocking(move || -> CliResult<_> {
        let old = std::fs::File::open(&old_path).map_err(io_err(&old_path))?;
        let new = std::fs::File::open(&new_path).map_err(io_err(&new_path))?;
        let out = std::fs::File::create(&patch_out).map_err(io_err(&patch_out))?;
        let mut out = BufWriter::with_capacity(1 << 20, out);
        let stats = flotilla_core::delta::encode(&old, &old_index, &new, &new_index, &opts, &mut out, &mut |d, _| {
            bar.set_position(d);
        })
        .map_err(|e| CliError::failure(format!("encoding the patch: {e}")))?;
        std::io::Write::flush(&mut out).map_err(io_err(&patch_out))?;
        Ok(stats)
    })
    .await
    .map_err(|e| CliError::failure(e.to_string()))??;
    pb.finish_and_clear();
    let encode_s = started.elapsed().as_secs_f64();
    let limit = chunk_bytes as f64 * (1.0 - tuning.delta_min_saving / 100.0);
    let kept = stats.method != DeltaMethod::Unknown && (stats.patch_size as f64) <= limit;
    let mut report = json!({
        "from_version": base.version,
        "from_version_code": base.version_code,
        "base": source,
        "method": stats.method,
        "patch_size": stats.patch_size,
        "chunk_bytes": chunk_bytes,
        "regions": stats.regions,
        "encode_s": encode_s,
        "kept": kept,
    });
    if !kept {
        return Ok((None, report));
    }
    let chunked = chunk_patch(&patch_path, target.index.params()).await?;
    let ids: Vec<String> = chunked.index.entries().iter().map(|e| e.id.to_hex()).collect();
    let missing = missing_ids(client, &ids).await?;
    let (_, uploaded) = upload_chunks(client, &patch_path, &chunked, &missing, 8, quiet).await?;
    let index_bytes = chunked.index.encode();
    client.put_bytes(&format!("/v1/indexes/{}", chunked.index.id()), index_bytes.clone()).await?;
    report["uploaded_bytes"] = json!(uploaded);
    report["patch_index"] = json!(chunked.index.id().to_hex());
    let from_version =
        flotilla_core::version::parse_version(&base.version).map_err(|e| CliError::failure(e.to_string()))?;
    let from_sha256: Sha256Digest =
        base.sha256.parse().map_err(|_| CliError::failure("the coordinator sent a malformed image_sha256"))?;
    let delta = Delta {
        from_version,
        from_version_code: base.version_code,
        from_sha256,
        method: stats.method,
        patch_index: IndexRef { id: chunked.index.id(), size: index_bytes.len() as u64 },
        patch_size: stats.patch_size,
    };
    Ok((Some(delta), report))
}

async fn chunk_patch(path: &Path, params: flotilla_core::chunking::ChunkParams) -> CliResult<ChunkedImage> {
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let file = std::fs::File::open(&path).map_err(io_err(&path))?;
        Chunker::new(params)
            .chunk_reader(std::io::BufReader::with_capacity(1 << 20, file))
            .map_err(|e| CliError::failure(format!("chunking the patch: {e}")))
    })
    .await
    .map_err(|e| CliError::failure(e.to_string()))?
}

/// `flotilla patch --from V1 --to V2`: builds one patch and re-publishes V2's manifest with
/// it (same version_code and payload; the coordinator accepts a re-publish that changes
/// only `deltas`).
///
/// # Errors
/// Unknown versions, a patch that does not pay, download, encode, upload or publish failures.
pub async fn patch(client: &Client, args: &PatchArgs, quiet: bool) -> CliResult<Value> {
    let keys = crate::keys::signing_keys(&args.keys)?;
    crate::release::check_keys_against_root(client, &args.product, &keys).await?;
    let releases = channel_releases(client, &args.product, &args.channel).await?;
    let find = |v: &str| {
        releases
            .iter()
            .find(|r| r.version == v)
            .cloned()
            .ok_or_else(|| CliError::usage(format!("no release {v} on {}/{}", args.product, args.channel)))
    };
    let (from, to) = (find(&args.from)?, find(&args.to)?);
    if from.version_code >= to.version_code {
        return Err(CliError::usage("--from must be an earlier release than --to"));
    }
    let release = client.get(&format!("/v1/releases/{}", to.id)).await?;
    let (_, mut manifest) = crate::ops::manifest_of(&release)?;
    let new_index = fetch_index(client, &to).await?;
    let work = tempfile::tempdir().map_err(|e| CliError::failure(format!("temp dir: {e}")))?;
    let new_path = match &args.image {
        Some(p) => {
            let sha = hash_locals(std::slice::from_ref(p)).await?.remove(0).1;
            if sha != to.sha256 {
                return Err(CliError::usage(format!(
                    "{} is not the image of {} (SHA-256 {sha})",
                    p.display(),
                    to.version
                )));
            }
            p.clone()
        }
        None => {
            let p = work.path().join("target.img");
            download_image(client, &to, &new_index, &p, quiet).await?;
            p
        }
    };
    let target = Target { path: &new_path, index: &new_index, sha256: manifest.payload.sha256 };
    let locals = hash_locals(&args.tuning.delta_base).await?;
    let (delta, report) = build(client, &from, target, &args.tuning, &locals, work.path(), quiet).await?;
    let Some(delta) = delta else {
        return Err(CliError::new(
            Kind::Rejected,
            format!(
                "the patch ({} bytes) does not beat chunk reuse ({} bytes) by {}%; nothing added (lower \
                 --delta-min-saving to force it)",
                report["patch_size"], report["chunk_bytes"], args.tuning.delta_min_saving
            ),
        ));
    };
    if manifest.deltas.contains(&delta) {
        // Already listed byte for byte: nothing to re-sign.
        return Ok(json!({
            "id": to.id,
            "version": to.version,
            "version_code": to.version_code,
            "deltas": manifest.deltas.len(),
            "unchanged": true,
            "patch": report,
        }));
    }
    manifest.deltas.retain(|d| d.from_version_code != delta.from_version_code);
    manifest.deltas.push(delta);
    if manifest.deltas.len() > MAX_DELTAS {
        return Err(CliError::usage(format!("{} already lists {MAX_DELTAS} deltas", to.version)));
    }
    let signers: Vec<&flotilla_core::keys::SigningKey> = keys.iter().collect();
    let envelope = manifest.sign(&signers).map_err(|e| CliError::usage(format!("cannot sign the manifest: {e}")))?;
    let manifest_json = String::from_utf8(envelope.to_json()).map_err(|e| CliError::failure(e.to_string()))?;
    let published = client.post("/v1/releases", &json!({ "product": args.product, "manifest": manifest_json })).await?;
    Ok(json!({
        "id": published["id"],
        "version": to.version,
        "version_code": to.version_code,
        "deltas": manifest.deltas.len(),
        "patch": report,
    }))
}
