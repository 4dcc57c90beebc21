//! Products, releases, status, rollout control, rollback and devices.

use flotilla_core::manifest::Manifest;
use flotilla_core::time::Timestamp;
use serde_json::{Value, json};

use crate::cli::{ProductCommand, RollbackArgs, RolloutCommand};
use crate::client::Client;
use crate::error::{CliError, CliResult, io_err};
use crate::keys::signing_keys;

/// `product create|list`.
pub async fn product(client: &Client, cmd: &ProductCommand) -> CliResult<Value> {
    match cmd {
        ProductCommand::Create { name, trust_root, enrollment_secret } => {
            let root = std::fs::read_to_string(trust_root).map_err(io_err(trust_root))?;
            flotilla_core::trust::TrustRoot::from_trusted_json(root.as_bytes())
                .map_err(|e| CliError::usage(format!("{}: {e}", trust_root.display())))?;
            client
                .post(
                    "/v1/products",
                    &json!({ "name": name, "trust_root": root, "enrollment_secret": enrollment_secret }),
                )
                .await
        }
        ProductCommand::List => client.get("/v1/products").await,
    }
}

/// `rollout …`.
pub async fn rollout(client: &Client, cmd: &RolloutCommand) -> CliResult<Value> {
    match cmd {
        RolloutCommand::Pause { id, reason } => {
            client.post(&format!("/v1/releases/{id}/pause"), &json!({ "reason": reason })).await
        }
        RolloutCommand::Resume(a) => client.post(&format!("/v1/releases/{}/resume", a.id), &json!({})).await,
        RolloutCommand::Advance(a) => client.post(&format!("/v1/releases/{}/advance", a.id), &json!({})).await,
        RolloutCommand::Set { id, percent } => {
            if !(0.0..=100.0).contains(percent) {
                return Err(CliError::usage("percent must be between 0 and 100"));
            }
            client.post(&format!("/v1/releases/{id}/percentage"), &json!({ "percent": percent })).await
        }
        RolloutCommand::Halt { id, reason } => {
            client.post(&format!("/v1/releases/{id}/halt"), &json!({ "reason": reason })).await
        }
    }
}

/// Parses the manifest the coordinator returns with a release (already verified at publish).
pub fn manifest_of(release: &Value) -> CliResult<(String, Manifest)> {
    let text =
        release["manifest"].as_str().ok_or_else(|| CliError::failure("the coordinator sent no manifest"))?.to_owned();
    let env =
        flotilla_core::dsse::Envelope::from_json(text.as_bytes()).map_err(|e| CliError::failure(e.to_string()))?;
    let m: Manifest = flotilla_core::json::from_slice(&env.payload, flotilla_core::manifest::MAX_MANIFEST_LEN)
        .map_err(|e| CliError::failure(e.to_string()))?;
    Ok((text, m))
}

/// `rollback ID [--to EARLIER]`: signs a new manifest for the earlier content under the next
/// version_code; the coordinator halts ID and offers it to everyone. No chunk is uploaded.
pub async fn rollback(client: &Client, args: &RollbackArgs) -> CliResult<Value> {
    let keys = signing_keys(&args.keys)?;
    let bad = client.get(&format!("/v1/releases/{}", args.id)).await?;
    let (_, bad_manifest) = manifest_of(&bad)?;
    let target = match args.to {
        Some(to) => client.get(&format!("/v1/releases/{to}")).await?,
        None => {
            let list = client
                .get(&format!(
                    "/v1/releases?product={}&channel={}&include_archived=true&limit=1000",
                    bad_manifest.product, bad_manifest.channel
                ))
                .await?;
            let earlier = list["releases"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|r| {
                    r["version_code"].as_u64().is_some_and(|c| c < bad_manifest.version_code)
                        && r["image_sha256"] != bad["image_sha256"]
                })
                .max_by_key(|r| r["version_code"].as_u64())
                .and_then(|r| r["id"].as_i64())
                .ok_or_else(|| {
                    CliError::usage("no earlier release with other content on this channel; pass --to ID")
                })?;
            client.get(&format!("/v1/releases/{earlier}")).await?
        }
    };
    let (_, earlier) = manifest_of(&target)?;
    let latest = crate::release::latest_version_code(client, &bad_manifest.product, &bad_manifest.channel).await?;
    let code = flotilla_core::version::next_version_code(latest);
    let version = match &args.version {
        Some(v) => flotilla_core::version::parse_version(v).map_err(|e| CliError::usage(e.to_string()))?,
        None => {
            let mut v = earlier.version.clone();
            v.pre = semver::Prerelease::EMPTY;
            v.build = semver::BuildMetadata::new(&format!("rollback.{code}"))
                .map_err(|e| CliError::failure(e.to_string()))?;
            v
        }
    };
    let now = Timestamp::now();
    let m = Manifest {
        version,
        version_code: code,
        created_at: now,
        expires_at: now.saturating_add(args.expires),
        ..earlier
    };
    let signers: Vec<&flotilla_core::keys::SigningKey> = keys.iter().collect();
    let env = m.sign(&signers).map_err(|e| CliError::usage(e.to_string()))?;
    let manifest = String::from_utf8(env.to_json()).map_err(|e| CliError::failure(e.to_string()))?;
    client.post(&format!("/v1/releases/{}/rollback", args.id), &json!({ "manifest": manifest })).await
}
