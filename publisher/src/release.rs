//! `flotilla release`: chunk and hash in one pass → ask which chunks the coordinator lacks →
//! upload only those, in parallel (a re-run after a cut sends only what did not arrive) →
//! upload the index → sign the manifest → publish.

use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use flotilla_core::chunking::{ChunkParams, ChunkedImage, Chunker};
use flotilla_core::manifest::{Compatibility, IndexRef, Manifest, PayloadKind};
use flotilla_core::time::Timestamp;
use flotilla_core::version::parse_version;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::{Value, json};

use crate::cli::ReleaseArgs;
use crate::client::Client;
use crate::error::{CliError, CliResult, Kind, io_err};
use crate::keys::signing_keys;

/// Ids per missing-chunks query.
const MISSING_BATCH: usize = 50_000;

/// A progress bar over bytes, drawn only on a terminal and never in `--json` mode.
pub fn progress(len: u64, what: &str, quiet: bool) -> ProgressBar {
    let pb = ProgressBar::new(len);
    if quiet || !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        pb.set_draw_target(ProgressDrawTarget::hidden());
    }
    let style = ProgressStyle::with_template("{msg:>10} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
        .map(|s| s.progress_chars("=> "))
        .unwrap_or_else(|_| ProgressStyle::default_bar());
    pb.set_style(style);
    pb.set_message(what.to_owned());
    pb
}

/// The image to publish: a file on disk and its payload kind (kept alive for temp files).
struct Input {
    path: PathBuf,
    kind: PayloadKind,
    _temp: Option<tempfile::TempDir>,
}

fn prepare_input(args: &ReleaseArgs) -> CliResult<Input> {
    if let Some(image) = &args.image {
        if !image.is_file() {
            return Err(CliError::usage(format!("{}: no such image file", image.display())));
        }
        return Ok(Input { path: image.clone(), kind: PayloadKind::Raw, _temp: None });
    }
    let temp = tempfile::tempdir().map_err(|e| CliError::failure(format!("temp dir: {e}")))?;
    let dir = if let Some(dir) = &args.dir {
        dir.clone()
    } else if args.react_native {
        let out = temp.path().join("bundle");
        std::fs::create_dir_all(&out).map_err(io_err(&out))?;
        let bundle = out.join(format!("index.{}.bundle", args.platform));
        let status = std::process::Command::new("npx")
            .args([
                "react-native",
                "bundle",
                "--platform",
                &args.platform,
                "--entry-file",
                &args.entry_file,
                "--dev",
                "false",
            ])
            .arg("--bundle-output")
            .arg(&bundle)
            .arg("--assets-dest")
            .arg(&out)
            .status()
            .map_err(|e| {
                CliError::usage(format!(
                    "cannot run npx react-native bundle: {e}; is Node installed and are you in the app's folder?"
                ))
            })?;
        if !status.success() {
            return Err(CliError::usage(format!(
                "npx react-native bundle failed ({status}); fix the bundle build first"
            )));
        }
        out
    } else {
        return Err(CliError::usage("say what to publish: --image FILE, --dir DIR or --react-native"));
    };
    if !dir.is_dir() {
        return Err(CliError::usage(format!("{}: no such directory", dir.display())));
    }
    let archive = temp.path().join("bundle.tar");
    let file = std::fs::File::create(&archive).map_err(io_err(&archive))?;
    flotilla_core::archive::pack_dir(&dir, std::io::BufWriter::new(file))
        .map_err(|e| CliError::usage(format!("packing {}: {e}", dir.display())))?;
    Ok(Input { path: archive, kind: PayloadKind::Archive, _temp: Some(temp) })
}

async fn chunk_file(path: &Path, params: ChunkParams, quiet: bool) -> CliResult<ChunkedImage> {
    let size = std::fs::metadata(path).map_err(io_err(path))?.len();
    let pb = progress(size, "chunking", quiet);
    let path = path.to_path_buf();
    let bar = pb.clone();
    let out = tokio::task::spawn_blocking(move || {
        let file = std::fs::File::open(&path).map_err(io_err(&path))?;
        Chunker::new(params)
            .chunk_reader_with(std::io::BufReader::with_capacity(1 << 20, file), |c| {
                bar.inc(c.data.len() as u64);
                Ok(())
            })
            .map_err(|e| CliError::failure(format!("chunking {}: {e}", path.display())))
    })
    .await
    .map_err(|e| CliError::failure(e.to_string()))??;
    pb.finish_and_clear();
    Ok(out)
}

/// The channel's latest version_code, if any.
pub async fn latest_version_code(client: &Client, product: &str, channel: &str) -> CliResult<Option<u64>> {
    let v = client
        .get(&format!("/v1/releases?product={product}&channel={channel}&include_archived=true&limit=1000"))
        .await?;
    Ok(v["releases"].as_array().into_iter().flatten().filter_map(|r| r["version_code"].as_u64()).max())
}

/// Ids the coordinator does not have.
pub async fn missing_ids(client: &Client, ids: &[String]) -> CliResult<std::collections::HashSet<String>> {
    let mut missing = std::collections::HashSet::new();
    for batch in ids.chunks(MISSING_BATCH) {
        let v = client.post("/v1/chunks/missing", &json!({ "ids": batch })).await?;
        for id in v["missing"].as_array().into_iter().flatten().filter_map(Value::as_str) {
            missing.insert(id.to_owned());
        }
    }
    Ok(missing)
}

/// Uploads the chunks of `chunked` that `missing` names, reading them from `path`.
/// Returns (chunks, bytes) sent.
pub async fn upload_chunks(
    client: &Client,
    path: &Path,
    chunked: &ChunkedImage,
    missing: &std::collections::HashSet<String>,
    parallel: usize,
    quiet: bool,
) -> CliResult<(u64, u64)> {
    let mut seen = std::collections::HashSet::new();
    let todo: Vec<(u64, flotilla_core::index::IndexEntry)> = chunked
        .index
        .iter_with_offsets()
        .filter(|(_, e)| missing.contains(&e.id.to_hex()) && seen.insert(e.id))
        .map(|(o, e)| (o, *e))
        .collect();
    let total: u64 = todo.iter().map(|(_, e)| u64::from(e.len)).sum();
    let pb = progress(total, "uploading", quiet);
    // Test hook: after this many uploads, stall for good, so a test can kill -9 the CLI at a
    // known point mid-upload and prove that a re-run sends only what did not arrive.
    let stall_after: Option<u64> = std::env::var("FLOTILLA_TEST_STALL_AFTER_UPLOADS").ok().and_then(|v| v.parse().ok());
    let file = Arc::new(std::fs::File::open(path).map_err(io_err(path))?);
    let sem = Arc::new(tokio::sync::Semaphore::new(parallel.max(1)));
    let done = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    let mut sent_bytes = 0u64;
    for (offset, entry) in todo {
        let permit = sem.clone().acquire_owned().await.map_err(|e| CliError::failure(e.to_string()))?;
        let (client, file, pb, done) = (client.clone(), file.clone(), pb.clone(), done.clone());
        tasks.spawn(async move {
            let _permit = permit;
            let object = tokio::task::spawn_blocking(move || -> CliResult<Vec<u8>> {
                let mut buf = vec![0u8; entry.len as usize];
                file.read_exact_at(&mut buf, offset)
                    .map_err(|e| CliError::failure(format!("reading the image: {e}")))?;
                if flotilla_core::ids::ChunkId::of(&buf) != entry.id {
                    return Err(CliError::new(
                        Kind::Verify,
                        "the image changed while it was being published; publish again",
                    ));
                }
                Ok(flotilla_core::object::encode(&buf, flotilla_core::object::DEFAULT_LEVEL))
            })
            .await
            .map_err(|e| CliError::failure(e.to_string()))??;
            client.put_bytes(&format!("/v1/chunks/{}?len={}", entry.id, entry.len), object).await?;
            pb.inc(u64::from(entry.len));
            let n = done.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
            if stall_after.is_some_and(|a| n >= a) {
                std::future::pending::<()>().await;
            }
            Ok::<u64, CliError>(u64::from(entry.len))
        });
        while tasks.len() > parallel * 2 {
            if let Some(r) = tasks.join_next().await {
                sent_bytes += r.map_err(|e| CliError::failure(e.to_string()))??;
            }
        }
    }
    while let Some(r) = tasks.join_next().await {
        sent_bytes += r.map_err(|e| CliError::failure(e.to_string()))??;
    }
    pb.finish_and_clear();
    Ok((done.load(std::sync::atomic::Ordering::SeqCst), sent_bytes))
}

/// Fails before any chunking or upload when a signing key is not a `release` key of the
/// product's trust root, since the coordinator would refuse the manifest at the very end.
pub async fn check_keys_against_root(
    client: &Client,
    product: &str,
    keys: &[flotilla_core::keys::SigningKey],
) -> CliResult<()> {
    let v = client.get(&format!("/v1/products/{product}")).await?;
    let root_json = v["trust_root"]
        .as_str()
        .ok_or_else(|| CliError::failure("the coordinator sent a product without a trust root"))?;
    let root = flotilla_core::trust::TrustRoot::from_trusted_json(root_json.as_bytes())
        .map_err(|e| CliError::failure(format!("the product's trust root is unusable: {e}")))?;
    for key in keys {
        let id = key.public_key().key_id();
        if !root.is_in_role(&id, flotilla_core::trust::Role::Release) {
            return Err(CliError::new(
                Kind::Rejected,
                format!(
                    "key {id} is not a release key of product {product:?}'s trust root (version {}); sign with one of \
                     its release keys, or rotate the root with `flotilla root rotate --release-key ...`",
                    root.version()
                ),
            ));
        }
    }
    Ok(())
}

/// `flotilla release`.
pub async fn run(client: &Client, args: &ReleaseArgs, quiet: bool) -> CliResult<Value> {
    let started = Instant::now();
    let keys = signing_keys(&args.keys)?;
    let version = parse_version(&args.version).map_err(|e| CliError::usage(e.to_string()))?;
    let min_native = args
        .min_native_version
        .as_deref()
        .map(parse_version)
        .transpose()
        .map_err(|e| CliError::usage(e.to_string()))?;
    let min_agent =
        args.min_agent_version.as_deref().map(parse_version).transpose().map_err(|e| CliError::usage(e.to_string()))?;
    let rollout = match args.rollout.as_str() {
        "staged" => Value::Null,
        p => {
            let p: f64 = p
                .trim_end_matches('%')
                .parse()
                .map_err(|_| CliError::usage("--rollout is a percentage (e.g. 5) or `staged`"))?;
            json!({ "percent": p })
        }
    };
    check_keys_against_root(client, &args.product, &keys).await?;
    let input = prepare_input(args)?;
    let params = if input.kind == PayloadKind::Raw { ChunkParams::IMAGE } else { ChunkParams::BUNDLE };
    let chunked = chunk_file(&input.path, params, quiet).await?;

    let version_code = match args.version_code {
        Some(c) => c,
        None => {
            flotilla_core::version::next_version_code(latest_version_code(client, &args.product, &args.channel).await?)
        }
    };
    let ids: Vec<String> = chunked.index.entries().iter().map(|e| e.id.to_hex()).collect();
    let missing = missing_ids(client, &ids).await?;
    let (uploaded_chunks, uploaded_bytes) =
        upload_chunks(client, &input.path, &chunked, &missing, args.parallel, quiet).await?;
    let index_bytes = chunked.index.encode();
    client.put_bytes(&format!("/v1/indexes/{}", chunked.index.id()), index_bytes.clone()).await?;
    let target = crate::delta::Target { path: &input.path, index: &chunked.index, sha256: chunked.sha256 };
    let (deltas, delta_report) =
        crate::delta::for_release(client, &args.product, &args.channel, version_code, target, &args.delta, quiet)
            .await?;

    let now = Timestamp::now();
    let manifest = Manifest {
        schema_version: flotilla_core::manifest::MANIFEST_SCHEMA_VERSION,
        product: args.product.clone(),
        channel: args.channel.clone(),
        version,
        version_code,
        security_version: args.security_version,
        payload: flotilla_core::manifest::Payload {
            kind: input.kind,
            size: chunked.index.image_size(),
            sha256: chunked.sha256,
            blake3: chunked.blake3,
        },
        chunking: params,
        index: IndexRef { id: chunked.index.id(), size: index_bytes.len() as u64 },
        deltas,
        compatibility: Compatibility {
            hardware: args.hardware.clone(),
            platforms: args.target_platforms.clone(),
            architectures: args.architectures.clone(),
            min_agent_version: min_agent,
            min_native_version: min_native,
        },
        mandatory: args.mandatory,
        created_at: now,
        expires_at: now.saturating_add(args.expires),
        notes: args.notes.clone(),
    };
    let signers: Vec<&flotilla_core::keys::SigningKey> = keys.iter().collect();
    let envelope = manifest.sign(&signers).map_err(|e| CliError::usage(format!("cannot sign the manifest: {e}")))?;
    let manifest_json = String::from_utf8(envelope.to_json()).map_err(|e| CliError::failure(e.to_string()))?;
    let published = client
        .post("/v1/releases", &json!({ "product": args.product, "manifest": manifest_json, "rollout": rollout }))
        .await
        .map_err(|e| match e.kind {
            Kind::Conflict => {
                CliError::new(Kind::Conflict, format!("{}; pick a new --version or --version-code", e.message))
            }
            _ => e,
        })?;
    Ok(json!({
        "id": published["id"],
        "product": args.product,
        "channel": args.channel,
        "version": args.version,
        "version_code": version_code,
        "payload_kind": if input.kind == PayloadKind::Raw { "raw" } else { "archive" },
        "image_size": chunked.index.image_size(),
        "image_sha256": chunked.sha256.to_hex(),
        "index_id": chunked.index.id().to_hex(),
        "chunks": chunked.index.len(),
        "uploaded_chunks": uploaded_chunks,
        "uploaded_bytes": uploaded_bytes,
        "reused_chunks": chunked.index.len() as u64 - uploaded_chunks,
        "deltas": delta_report,
        "rollout": published["basis_points"].as_u64().map(|bp| bp as f64 / 100.0),
        "elapsed_s": started.elapsed().as_secs_f64(),
    }))
}
