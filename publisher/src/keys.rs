//! `flotilla keys` and `flotilla root`.

use std::path::{Path, PathBuf};

use flotilla_core::keys::{Algorithm, PublicKey, SigningKey};
use flotilla_core::time::Timestamp;
use flotilla_core::trust::{RootDocument, TrustRoot};
use serde_json::json;

use crate::client::Client;
use crate::config::{config_dir, write_private};
use crate::error::{CliError, CliResult, Kind, io_err};

/// Default path of a named key.
pub fn default_key_path(name: &str) -> CliResult<PathBuf> {
    Ok(config_dir()?.join("keys").join(format!("{name}.pem")))
}

/// Loads a private key.
pub fn load_signing_key(path: &Path) -> CliResult<SigningKey> {
    let pem = std::fs::read_to_string(path).map_err(io_err(path))?;
    SigningKey::from_pkcs8_pem(&pem)
        .map_err(|e| CliError::usage(format!("{}: not a private key Flotilla can use: {e}", path.display())))
}

/// Loads the signing keys given, or the default release key.
pub fn signing_keys(paths: &[PathBuf]) -> CliResult<Vec<SigningKey>> {
    let paths = if paths.is_empty() { vec![default_key_path("release")?] } else { paths.to_vec() };
    paths
        .iter()
        .map(|p| {
            if !p.exists() {
                return Err(CliError::usage(format!(
                    "{}: no such key; create one with `flotilla keys generate` or pass --key",
                    p.display()
                )));
            }
            load_signing_key(p)
        })
        .collect()
}

/// Loads a public key from a private or public PEM file.
pub fn load_public_key(path: &Path) -> CliResult<PublicKey> {
    let pem = std::fs::read_to_string(path).map_err(io_err(path))?;
    if pem.contains("PRIVATE KEY") {
        return Ok(load_signing_key(path)?.public_key().clone());
    }
    PublicKey::from_pem(Algorithm::Ed25519, &pem)
        .or_else(|_| PublicKey::from_pem(Algorithm::RsaPssSha256, &pem))
        .map_err(|e| CliError::usage(format!("{}: not a public key Flotilla can use: {e}", path.display())))
}

/// `keys generate`.
pub fn generate(out: Option<PathBuf>, name: &str, algorithm: &str) -> CliResult<serde_json::Value> {
    let algorithm: Algorithm =
        algorithm.parse().map_err(|e: flotilla_core::keys::KeyError| CliError::usage(e.to_string()))?;
    let path = match out {
        Some(p) => p,
        None => default_key_path(name)?,
    };
    if path.exists() {
        return Err(CliError::new(Kind::Conflict, format!("{} exists; refusing to overwrite a key", path.display())));
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    }
    let key = SigningKey::generate(algorithm).map_err(|e| CliError::failure(e.to_string()))?;
    let pem = key.to_pkcs8_pem().map_err(|e| CliError::failure(e.to_string()))?;
    write_private(&path, pem.as_bytes())?;
    let public = path.with_extension("pub.pem");
    std::fs::write(&public, key.public_key().to_pem()).map_err(io_err(&public))?;
    Ok(
        json!({ "key": path, "public_key": public, "key_id": key.public_key().key_id().to_hex(), "algorithm": algorithm.to_string() }),
    )
}

/// `keys show`.
pub fn show(path: &Path) -> CliResult<serde_json::Value> {
    let key = load_public_key(path)?;
    Ok(
        json!({ "key_id": key.key_id().to_hex(), "algorithm": key.algorithm().to_string(), "public_key_pem": key.to_pem() }),
    )
}

/// `root init`.
pub async fn root_init(args: &crate::cli::RootInitArgs, client: Option<&Client>) -> CliResult<serde_json::Value> {
    let root_keys = args.root_keys.iter().map(|p| load_signing_key(p)).collect::<CliResult<Vec<_>>>()?;
    let release = args.release_keys.iter().map(|p| load_public_key(p)).collect::<CliResult<Vec<_>>>()?;
    let rollout = match (&args.rollout_key, client) {
        (Some(p), _) => load_public_key(p)?,
        (None, Some(c)) => {
            let v = c.get("/v1/rollout-key").await?;
            let pem =
                v["public_key_pem"].as_str().ok_or_else(|| CliError::failure("coordinator sent no rollout key"))?;
            PublicKey::from_pem(Algorithm::Ed25519, pem).map_err(|e| CliError::failure(e.to_string()))?
        }
        (None, None) => return Err(CliError::usage("give --rollout-key or a coordinator URL to fetch it from")),
    };
    let roots: Vec<&PublicKey> = root_keys.iter().map(SigningKey::public_key).collect();
    let releases: Vec<&PublicKey> = release.iter().collect();
    let doc = RootDocument::new(
        1,
        Timestamp::now().saturating_add(args.expires_in),
        (&roots, args.root_threshold),
        (&releases, args.release_threshold),
        (&[&rollout], 1),
    );
    TrustRoot::from_document(doc.clone()).map_err(|e| CliError::usage(e.to_string()))?;
    let signers: Vec<&SigningKey> = root_keys.iter().collect();
    let env = doc.sign(&signers).map_err(|e| CliError::failure(e.to_string()))?;
    let json = env.to_json();
    TrustRoot::from_trusted_json(&json).map_err(|e| CliError::usage(format!("the new root does not verify: {e}")))?;
    std::fs::write(&args.out, &json).map_err(io_err(&args.out))?;
    Ok(json!({ "trust_root": args.out, "version": 1, "rollout_key_id": rollout.key_id().to_hex() }))
}

/// `root rotate`: version N+1, signed by a threshold of the current root keys and of the new.
pub fn root_rotate(args: &crate::cli::RootRotateArgs) -> CliResult<serde_json::Value> {
    let current_json = std::fs::read(&args.current).map_err(io_err(&args.current))?;
    let current = TrustRoot::from_trusted_json(&current_json)
        .map_err(|e| CliError::new(Kind::Verify, format!("{}: {e}", args.current.display())))?;
    let old_signers = args.sign_with.iter().map(|p| load_signing_key(p)).collect::<CliResult<Vec<_>>>()?;
    let new_root_keys = args.root_keys.iter().map(|p| load_signing_key(p)).collect::<CliResult<Vec<_>>>()?;
    let doc = current.document();
    let keys_of = |ids: &[flotilla_core::ids::KeyId]| -> Vec<PublicKey> {
        ids.iter().filter_map(|id| current.key(id).cloned()).collect()
    };
    let root_pub: Vec<PublicKey> = if new_root_keys.is_empty() {
        keys_of(&doc.roles.root.keyids)
    } else {
        new_root_keys.iter().map(|k| k.public_key().clone()).collect()
    };
    let release_pub: Vec<PublicKey> = if args.release_keys.is_empty() {
        keys_of(&doc.roles.release.keyids)
    } else {
        args.release_keys.iter().map(|p| load_public_key(p)).collect::<CliResult<_>>()?
    };
    let rollout_pub = keys_of(&doc.roles.rollout.keyids);
    let next = RootDocument::new(
        doc.version + 1,
        Timestamp::now().saturating_add(args.expires_in),
        (&refs(&root_pub)[..], doc.roles.root.threshold.min(root_pub.len() as u32)),
        (&refs(&release_pub)[..], doc.roles.release.threshold.min(release_pub.len() as u32)),
        (&refs(&rollout_pub)[..], doc.roles.rollout.threshold),
    );
    let mut signers: Vec<&SigningKey> = old_signers.iter().collect();
    for k in &new_root_keys {
        if !signers.iter().any(|s| s.public_key() == k.public_key()) {
            signers.push(k);
        }
    }
    let json = next.sign(&signers).map_err(|e| CliError::failure(e.to_string()))?.to_json();
    current.rotate(&json).map_err(|e| {
        CliError::usage(format!(
            "the rotation would not be accepted by devices: {e}; sign with a threshold of the current root keys"
        ))
    })?;
    std::fs::write(&args.out, &json).map_err(io_err(&args.out))?;
    Ok(json!({ "trust_root": args.out, "version": doc.version + 1 }))
}

fn refs(v: &[PublicKey]) -> Vec<&PublicKey> {
    v.iter().collect()
}
