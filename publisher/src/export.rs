//! `flotilla export` and `flotilla verify`: a release as a directory an offline site can
//! import from a USB stick, and the checks a device would make on it.

use std::path::{Path, PathBuf};

use flotilla_core::chunking::Chunker;
use flotilla_core::manifest::{VerifiedManifest, verify_signed};
use flotilla_core::rollout::{AssignedRelease, ROLLOUT_SCHEMA_VERSION, RolloutDirective, RolloutSalt};
use flotilla_core::time::Timestamp;
use flotilla_core::trust::TrustRoot;
use serde_json::{Value, json};
use sha2::Digest as _;

use crate::cli::ExportArgs;
use crate::client::Client;
use crate::error::{CliError, CliResult, Kind, io_err};
use crate::release::progress;

/// Files of an export.
pub const TRUST_ROOT_FILE: &str = "trust-root.json";
/// The signed manifest.
pub const MANIFEST_FILE: &str = "manifest.json";
/// The chunk index.
pub const INDEX_FILE: &str = "index.bin";
/// The signed rollout directive (present when exported with `--directive-key`).
pub const DIRECTIVE_FILE: &str = "directive.json";

fn chunk_path(dir: &Path, id: &str) -> PathBuf {
    dir.join("chunks").join(&id[..2]).join(id)
}

/// Whether `path` names a tar file rather than a directory.
fn is_tar(path: &Path) -> bool {
    path.extension().is_some_and(|e| e == "tar")
}

/// `flotilla export ID DIR|FILE.tar`: a directory, or the same tree as one deterministic tar
/// (written under a temporary name and renamed, so a cut never leaves a half tar behind).
pub async fn export_any(client: &Client, args: &ExportArgs, quiet: bool) -> CliResult<Value> {
    let (id, out) = (args.id, args.out.as_path());
    let directive = args.directive_key.as_deref().map(|key| DirectiveArgs {
        key,
        percent: args.percent,
        salt: args.salt,
        ttl: args.directive_ttl,
    });
    if !is_tar(out) {
        return export(client, id, out, directive, quiet).await;
    }
    if out.exists() {
        return Err(CliError::usage(format!("{} exists; export into a new file", out.display())));
    }
    let parent = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let staging = tempfile::tempdir_in(parent).map_err(io_err(parent))?;
    let tree = staging.path().join("release");
    let mut v = export(client, id, &tree, directive, quiet).await?;
    let partial = staging.path().join("release.tar");
    let file = std::fs::File::create(&partial).map_err(io_err(&partial))?;
    let mut w = std::io::BufWriter::new(file);
    flotilla_core::archive::pack_dir(&tree, &mut w)
        .map_err(|e| CliError::failure(format!("writing {}: {e}", out.display())))?;
    let file = w.into_inner().map_err(|e| CliError::failure(format!("writing {}: {e}", out.display())))?;
    file.sync_all().map_err(io_err(&partial))?;
    std::fs::rename(&partial, out).map_err(io_err(out))?;
    v["dir"] = Value::Null;
    v["file"] = json!(out);
    Ok(v)
}

/// `flotilla verify DIR|FILE.tar ...`: a tar is unpacked (bounded, no escaping paths) into a
/// temporary directory first.
pub fn verify_any(
    export: Option<&Path>,
    trust_root: Option<&Path>,
    image: Option<&Path>,
    manifest: Option<&Path>,
    quiet: bool,
) -> CliResult<Value> {
    let Some(tar) = export.filter(|p| is_tar(p)) else {
        return verify(export, trust_root, image, manifest, quiet);
    };
    let staging = tempfile::tempdir().map_err(|e| CliError::failure(format!("temp dir: {e}")))?;
    let file = std::fs::File::open(tar).map_err(io_err(tar))?;
    flotilla_core::archive::unpack(
        std::io::BufReader::new(file),
        staging.path(),
        flotilla_core::archive::UnpackLimits::default(),
    )
    .map_err(|e| CliError::new(Kind::Verify, format!("{}: not a Flotilla export: {e}", tar.display())))?;
    let mut v = verify(Some(staging.path()), trust_root, image, manifest, quiet)?;
    v["dir"] = Value::Null;
    v["file"] = json!(tar);
    Ok(v)
}

/// What `--directive-key` and its options ask for.
#[derive(Debug, Clone, Copy)]
pub struct DirectiveArgs<'a> {
    /// The `rollout`-role signing key.
    pub key: &'a Path,
    /// Share of devices in percent; `None`: the release's current rollout percent.
    pub percent: Option<f64>,
    /// Bucketing salt; `None`: a random one.
    pub salt: Option<RolloutSalt>,
    /// Validity.
    pub ttl: std::time::Duration,
}

/// Signs the rollout directive of an export: the release's hashes (from its verified
/// manifest), the share of devices and the salt, valid for `ttl`.
fn sign_directive(d: &DirectiveArgs<'_>, release: &Value, m: &VerifiedManifest) -> CliResult<(Vec<u8>, u16)> {
    let percent = match d.percent {
        Some(p) => p,
        None => release["rollout"]["percent"]
            .as_f64()
            .ok_or_else(|| CliError::failure("the coordinator sent no rollout percent; pass --percent"))?,
    };
    if !(0.0..=100.0).contains(&percent) {
        return Err(CliError::usage(format!("--percent {percent} is not between 0 and 100")));
    }
    let basis_points = (percent * 100.0).round() as u16;
    let salt = match d.salt {
        Some(s) => s,
        None => RolloutSalt::random().map_err(|e| CliError::failure(format!("random salt: {e}")))?,
    };
    let key = crate::keys::load_signing_key(d.key)?;
    let man = m.manifest();
    let now = Timestamp::now();
    let directive = RolloutDirective {
        schema_version: ROLLOUT_SCHEMA_VERSION,
        product: man.product.clone(),
        channel: man.channel.clone(),
        release: AssignedRelease::for_manifest(m),
        basis_points,
        salt,
        issued_at: now,
        expires_at: now.saturating_add(d.ttl),
    };
    let envelope = directive.sign(&[&key]).map_err(|e| CliError::failure(format!("signing the directive: {e}")))?;
    Ok((envelope.to_json(), basis_points))
}

/// `flotilla export ID DIR`.
pub async fn export(
    client: &Client,
    id: i64,
    out: &Path,
    directive: Option<DirectiveArgs<'_>>,
    quiet: bool,
) -> CliResult<Value> {
    if out.exists() && std::fs::read_dir(out).map_err(io_err(out))?.next().is_some() {
        return Err(CliError::usage(format!("{} is not empty; export into a new directory", out.display())));
    }
    let release = client.get(&format!("/v1/releases/{id}")).await?;
    let (manifest_json, manifest) = crate::ops::manifest_of(&release)?;
    let product = client.get(&format!("/v1/products/{}", manifest.product)).await?;
    let root = product["trust_root"].as_str().ok_or_else(|| CliError::failure("the coordinator sent no trust root"))?;
    std::fs::create_dir_all(out).map_err(io_err(out))?;
    let write = |name: &str, bytes: &[u8]| std::fs::write(out.join(name), bytes).map_err(io_err(&out.join(name)));
    write(TRUST_ROOT_FILE, root.as_bytes())?;
    write(MANIFEST_FILE, manifest_json.as_bytes())?;
    let mut directive_bp = None;
    if let Some(d) = &directive {
        // Signed over the manifest as the product's trust root verifies it, and checked
        // against that root, so a key outside the `rollout` role fails here and not at a site.
        let trust = TrustRoot::from_trusted_json(root.as_bytes())
            .map_err(|e| CliError::new(Kind::Verify, format!("the product's trust root: {e}")))?;
        let verified = verify_signed(manifest_json.as_bytes(), &trust, Timestamp::now())
            .map_err(|e| CliError::new(Kind::Verify, format!("manifest: {e}")))?;
        let (envelope, bp) = sign_directive(d, &release, &verified)?;
        RolloutDirective::verify(&envelope, &trust, Timestamp::now()).map_err(|e| {
            CliError::usage(format!(
                "{}: the directive does not verify against the product's trust root: {e}",
                d.key.display()
            ))
        })?;
        write(DIRECTIVE_FILE, &envelope)?;
        directive_bp = Some(bp);
    }
    let index_bytes = client.get_bytes(&format!("/v1/indexes/{}", manifest.index.id)).await?;
    let index = flotilla_core::index::ChunkIndex::decode(&index_bytes)
        .map_err(|e| CliError::new(Kind::Verify, e.to_string()))?;
    write(INDEX_FILE, &index_bytes)?;
    let pb = progress(index.image_size(), "exporting", quiet);
    let mut seen = std::collections::HashSet::new();
    let mut bytes = 0u64;
    for e in index.entries() {
        pb.inc(u64::from(e.len));
        if !seen.insert(e.id) {
            continue;
        }
        let hex = e.id.to_hex();
        let object = client.get_bytes(&format!("/v1/chunks/{hex}")).await?;
        flotilla_core::object::decode(&object, &e.id, e.len)
            .map_err(|err| CliError::new(Kind::Verify, format!("chunk {hex} from the coordinator: {err}")))?;
        let path = chunk_path(out, &hex);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(io_err(parent))?;
        }
        bytes += object.len() as u64;
        std::fs::write(&path, &object).map_err(io_err(&path))?;
    }
    pb.finish_and_clear();
    Ok(
        json!({ "dir": out, "release": id, "version": manifest.version.to_string(), "version_code": manifest.version_code, "chunks": seen.len(), "bytes": bytes, "directive_percent": directive_bp.map(|bp| f64::from(bp) / 100.0) }),
    )
}

fn load_root(path: &Path) -> CliResult<TrustRoot> {
    let bytes = std::fs::read(path).map_err(io_err(path))?;
    TrustRoot::from_trusted_json(&bytes).map_err(|e| CliError::new(Kind::Verify, format!("{}: {e}", path.display())))
}

/// `flotilla verify DIR` or `flotilla verify --image FILE --manifest M --trust-root R`.
pub fn verify(
    dir: Option<&Path>,
    trust_root: Option<&Path>,
    image: Option<&Path>,
    manifest: Option<&Path>,
    quiet: bool,
) -> CliResult<Value> {
    let mut warnings = Vec::new();
    let root_path = match (trust_root, dir) {
        (Some(r), _) => r.to_path_buf(),
        (None, Some(d)) => {
            warnings.push(
                "checked against the export's own trust root; pass --trust-root with the one your devices trust"
                    .to_owned(),
            );
            d.join(TRUST_ROOT_FILE)
        }
        (None, None) => return Err(CliError::usage("give an export directory or --trust-root")),
    };
    let root = load_root(&root_path)?;
    let manifest_path = match (manifest, dir) {
        (Some(m), _) => m.to_path_buf(),
        (None, Some(d)) => d.join(MANIFEST_FILE),
        (None, None) => return Err(CliError::usage("give an export directory or --manifest")),
    };
    let manifest_bytes = std::fs::read(&manifest_path).map_err(io_err(&manifest_path))?;
    let verified = verify_signed(&manifest_bytes, &root, Timestamp::now())
        .map_err(|e| CliError::new(Kind::Verify, format!("manifest: {e}")))?;
    let m = verified.manifest().clone();

    if let Some(image) = image {
        let file = std::fs::File::open(image).map_err(io_err(image))?;
        let size = file.metadata().map_err(io_err(image))?.len();
        let pb = progress(size, "verifying", quiet);
        let out = Chunker::new(m.chunking)
            .chunk_reader_with(std::io::BufReader::new(file), |c| {
                pb.inc(c.data.len() as u64);
                Ok(())
            })
            .map_err(|e| CliError::failure(e.to_string()))?;
        pb.finish_and_clear();
        if out.sha256 != m.payload.sha256 || out.index.id() != m.index.id {
            return Err(CliError::new(
                Kind::Verify,
                format!("{} is not the image of release {} (SHA-256 {})", image.display(), m.version, out.sha256),
            ));
        }
        return Ok(
            json!({ "ok": true, "image": image, "version": m.version.to_string(), "sha256": out.sha256.to_hex(), "warnings": warnings }),
        );
    }

    let dir = dir.ok_or_else(|| CliError::usage("give an export directory or --image"))?;
    let index_path = dir.join(INDEX_FILE);
    let index_bytes = std::fs::read(&index_path).map_err(io_err(&index_path))?;
    let index = verified.check_index(&index_bytes).map_err(|e| CliError::new(Kind::Verify, format!("index: {e}")))?;
    let pb = progress(index.image_size(), "verifying", quiet);
    let mut sha = sha2::Sha256::new();
    let mut buf = Vec::new();
    for e in index.entries() {
        let hex = e.id.to_hex();
        let path = chunk_path(dir, &hex);
        let object = std::fs::read(&path).map_err(|err| CliError::new(Kind::Verify, format!("chunk {hex}: {err}")))?;
        flotilla_core::object::decode_into(&object, &e.id, e.len, &mut buf)
            .map_err(|err| CliError::new(Kind::Verify, format!("chunk {hex}: {err}")))?;
        sha.update(&buf);
        pb.inc(u64::from(e.len));
    }
    pb.finish_and_clear();
    let digest = flotilla_core::ids::Sha256Digest::from_bytes(sha.finalize().into());
    if digest != m.payload.sha256 {
        return Err(CliError::new(
            Kind::Verify,
            format!("the reassembled image hashes to {digest}, the manifest says {}", m.payload.sha256),
        ));
    }
    Ok(
        json!({ "ok": true, "dir": dir, "version": m.version.to_string(), "version_code": m.version_code, "chunks": index.len(), "image_sha256": digest.to_hex(), "warnings": warnings }),
    )
}
