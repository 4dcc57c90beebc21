//! Publisher endpoints: content uploads and releases. A release becomes visible only after
//! its manifest verifies against the product's trust root and its index and every chunk are
//! stored; the release row is written in one transaction, so a server that dies mid-publish
//! leaves no half-published release.

use std::collections::HashSet;
use std::sync::atomic::Ordering;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use flotilla_core::ids::{ChunkId, IndexId};
use flotilla_core::index::ChunkIndex;
use flotilla_core::manifest::{VerifiedManifest, verify_signed};
use flotilla_core::rollout::RolloutSalt;
use flotilla_core::time::Timestamp;
use serde::Deserialize;

use crate::auth::Principal;
use crate::config::{Stage, validate_stages};
use crate::db::{is_unique_violation, now};
use crate::error::{ApiError, ApiResult};
use crate::rollout::{StagePlan, audit};
use crate::state::AppState;
use crate::storage::{ObjectKind, ObjectStore as _, object_key};

/// Most ids in one missing-chunks query.
const MAX_MISSING_QUERY: usize = 100_000;
/// Ids per SQL `IN (...)` list.
const ID_BATCH: usize = 500;
/// Largest chunk accepted (FastCDC's maximum).
const MAX_CHUNK_LEN: u32 = 16 << 20;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct MissingRequest {
    ids: Vec<ChunkId>,
}

/// Ids among `ids` with an object of `kind` stored.
pub(crate) async fn stored_ids(
    state: &AppState,
    kind: ObjectKind,
    ids: &[String],
) -> Result<HashSet<String>, sqlx::Error> {
    let mut present = HashSet::new();
    for batch in ids.chunks(ID_BATCH) {
        let placeholders: Vec<String> = (0..batch.len()).map(|i| format!("${}", i + 2)).collect();
        let sql = format!("SELECT id FROM objects WHERE kind = $1 AND id IN ({})", placeholders.join(", "));
        // Only numbered placeholders are formatted in; every id is bound.
        let mut q = sqlx::query_scalar::<_, String>(sqlx::AssertSqlSafe(sql)).bind(kind.as_str());
        for id in batch {
            q = q.bind(id);
        }
        present.extend(q.fetch_all(&state.db.pool).await?);
    }
    Ok(present)
}

/// Whether an object of `kind` with id `id` (hex) is stored.
pub(crate) async fn is_stored(state: &AppState, kind: ObjectKind, id: &str) -> Result<bool, sqlx::Error> {
    let found: Option<i64> = sqlx::query_scalar("SELECT size FROM objects WHERE kind = $1 AND id = $2")
        .bind(kind.as_str())
        .bind(id)
        .fetch_optional(&state.db.pool)
        .await?;
    Ok(found.is_some())
}

pub(crate) async fn missing_chunks(
    State(state): State<AppState>,
    who: Principal,
    Json(req): Json<MissingRequest>,
) -> ApiResult<Json<serde_json::Value>> {
    who.require_any_publisher()?;
    if req.ids.len() > MAX_MISSING_QUERY {
        return Err(ApiError::bad_request(format!("at most {MAX_MISSING_QUERY} ids per query")));
    }
    let ids: Vec<String> = req.ids.iter().map(ChunkId::to_hex).collect();
    let present = stored_ids(&state, ObjectKind::Chunk, &ids).await?;
    let mut seen = HashSet::new();
    let missing: Vec<&String> = ids.iter().filter(|id| !present.contains(*id) && seen.insert(*id)).collect();
    Ok(Json(serde_json::json!({ "missing": missing })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PutChunkQuery {
    /// Uncompressed chunk length (from the index): the bound for decompression.
    len: u32,
}

async fn record_object(state: &AppState, kind: ObjectKind, id: &str, size: usize) -> Result<(), sqlx::Error> {
    let res = sqlx::query("INSERT INTO objects (kind, id, size) VALUES ($1, $2, $3)")
        .bind(kind.as_str())
        .bind(id)
        .bind(size as i64)
        .execute(&state.db.pool)
        .await;
    match res {
        Err(e) if !is_unique_violation(&e) => Err(e),
        _ => Ok(()),
    }
}

pub(crate) async fn put_chunk(
    State(state): State<AppState>,
    who: Principal,
    Path(id): Path<String>,
    Query(q): Query<PutChunkQuery>,
    body: Bytes,
) -> ApiResult<StatusCode> {
    who.require_any_publisher()?;
    let id: ChunkId = id.parse().map_err(|_| ApiError::bad_request("chunk ids are 64 lowercase hex characters"))?;
    if q.len == 0 || q.len > MAX_CHUNK_LEN {
        return Err(ApiError::bad_request(format!("len must be between 1 and {MAX_CHUNK_LEN}")));
    }
    let object = body.to_vec();
    let check = object.clone();
    // Decompressing and hashing is CPU work: keep it off the async threads.
    tokio::task::spawn_blocking(move || flotilla_core::object::decode(&check, &id, q.len).map(|_| ()))
        .await
        .map_err(ApiError::internal)?
        .map_err(|e| ApiError::unprocessable("chunk_rejected", format!("chunk {id} refused: {e}")))?;
    let hex = id.to_hex();
    let size = object.len();
    state.store.put(&object_key(ObjectKind::Chunk, &hex), object).await?;
    record_object(&state, ObjectKind::Chunk, &hex, size).await?;
    state.metrics.chunks_uploaded.fetch_add(1, Ordering::Relaxed);
    Ok(StatusCode::CREATED)
}

pub(crate) async fn put_index(
    State(state): State<AppState>,
    who: Principal,
    Path(id): Path<String>,
    body: Bytes,
) -> ApiResult<StatusCode> {
    who.require_any_publisher()?;
    let id: IndexId = id.parse().map_err(|_| ApiError::bad_request("index ids are 64 lowercase hex characters"))?;
    let actual = IndexId::of(&body);
    if actual != id {
        return Err(ApiError::unprocessable("index_rejected", format!("index hashes to {actual}, not {id}")));
    }
    ChunkIndex::decode(&body).map_err(|e| ApiError::unprocessable("index_rejected", format!("index refused: {e}")))?;
    let hex = id.to_hex();
    let size = body.len();
    state.store.put(&object_key(ObjectKind::Index, &hex), body.to_vec()).await?;
    record_object(&state, ObjectKind::Index, &hex, size).await?;
    Ok(StatusCode::CREATED)
}

/// How a new release rolls out.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RolloutRequest {
    /// A fixed percentage; the operator advances by hand.
    #[serde(default)]
    percent: Option<f64>,
    /// A stage plan the evaluator follows.
    #[serde(default)]
    stages: Option<Vec<Stage>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PublishRequest {
    /// The product (selects the trust root the manifest is verified against).
    product: String,
    /// The signed manifest envelope, as a string so its bytes are kept verbatim.
    manifest: String,
    #[serde(default)]
    rollout: Option<RolloutRequest>,
}

fn plan_for(state: &AppState, req: Option<&RolloutRequest>, product_plan: Option<String>) -> ApiResult<StagePlan> {
    match req {
        Some(RolloutRequest { percent: Some(_), stages: Some(_) }) => {
            Err(ApiError::bad_request("give either rollout.percent or rollout.stages, not both"))
        }
        Some(RolloutRequest { percent: Some(p), .. }) => {
            if !(*p > 0.0 && *p <= 100.0) {
                return Err(ApiError::bad_request("rollout.percent must be in (0, 100]"));
            }
            let first = Stage { percent: *p, min_reports: 0, max_failure_rate: 1.0, min_duration: Default::default() };
            let mut stages = vec![first];
            if *p < 100.0 {
                stages.push(Stage { percent: 100.0, ..stages[0].clone() });
            }
            Ok(StagePlan { stages, auto: false })
        }
        Some(RolloutRequest { stages: Some(stages), .. }) => {
            validate_stages(stages).map_err(ApiError::bad_request)?;
            Ok(StagePlan { stages: stages.clone(), auto: true })
        }
        _ => match product_plan {
            Some(json) => serde_json::from_str(&json).map_err(ApiError::internal),
            None => Ok(StagePlan { stages: state.config.stages.clone(), auto: true }),
        },
    }
}

/// Verifies and records a release. Shared by publish and rollback.
async fn publish(
    state: &AppState,
    who: &Principal,
    req: PublishRequest,
    plan_override: Option<StagePlan>,
) -> ApiResult<(i64, VerifiedManifest, StagePlan)> {
    who.require_publisher_of(&req.product)?;
    let product_row: Option<Option<String>> = sqlx::query_scalar("SELECT stage_plan FROM products WHERE name = $1")
        .bind(&req.product)
        .fetch_optional(&state.db.pool)
        .await?;
    let Some(product_plan) = product_row else {
        return Err(ApiError::not_found(format!("no product {:?}", req.product)));
    };
    let root =
        state.cache.root(&req.product).ok_or_else(|| ApiError::internal("product without a usable trust root"))?;
    let verified = verify_signed(req.manifest.as_bytes(), &root, Timestamp::now())
        .map_err(|e| ApiError::unprocessable("manifest_rejected", format!("manifest refused: {e}")))?;
    let m = verified.manifest().clone();
    if m.product != req.product {
        return Err(ApiError::unprocessable(
            "manifest_rejected",
            format!("manifest is for product {:?}, not {:?}", m.product, req.product),
        ));
    }
    let version_code =
        i64::try_from(m.version_code).map_err(|_| ApiError::bad_request("version_code must fit in i64"))?;
    let existing: Option<i64> =
        sqlx::query_scalar("SELECT version_code FROM releases WHERE product = $1 AND channel = $2 AND version = $3")
            .bind(&m.product)
            .bind(&m.channel)
            .bind(m.version.to_string())
            .fetch_optional(&state.db.pool)
            .await?;
    if existing.is_some() {
        return Err(ApiError::conflict(format!(
            "version {} is already published on {}/{}",
            m.version, m.product, m.channel
        )));
    }
    let latest: Option<i64> =
        sqlx::query_scalar("SELECT MAX(version_code) FROM releases WHERE product = $1 AND channel = $2")
            .bind(&m.product)
            .bind(&m.channel)
            .fetch_one(&state.db.pool)
            .await?;
    if let Err(e) = flotilla_core::version::check_next(latest.map(|l| l as u64), m.version_code) {
        return Err(ApiError::conflict(e.to_string()));
    }

    // Index and chunks must all be stored before the release exists.
    let index_key = object_key(ObjectKind::Index, &m.index.id.to_hex());
    let index_bytes = state.store.get(&index_key, None).await?.ok_or_else(|| {
        ApiError::unprocessable(
            "index_missing",
            format!("index {} is not uploaded; PUT /v1/indexes/{{id}} first", m.index.id),
        )
    })?;
    let index = verified
        .check_index(&index_bytes.bytes)
        .map_err(|e| ApiError::unprocessable("index_rejected", e.to_string()))?;
    let ids: Vec<String> = index.entries().iter().map(|e| e.id.to_hex()).collect();
    let present = stored_ids(state, ObjectKind::Chunk, &ids).await?;
    let missing = ids.iter().filter(|id| !present.contains(*id)).count();
    if missing > 0 {
        return Err(ApiError::unprocessable(
            "chunks_missing",
            format!("{missing} chunk(s) of this release are not uploaded; ask POST /v1/chunks/missing and upload them"),
        ));
    }

    check_deltas_stored(state, &m).await?;

    let plan = match plan_override {
        Some(p) => p,
        None => plan_for(state, req.rollout.as_ref(), product_plan)?,
    };
    let salt = RolloutSalt::random().map_err(ApiError::internal)?;
    let t = now();
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO releases (product, channel, version, version_code, manifest, manifest_sha256, image_size, image_sha256, \
         index_id, index_size, mandatory, salt, archived, created_at, state, stage, basis_points, stage_plan, stage_started) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, 0, $13, $17, 0, $14, $15, $16) RETURNING id",
    )
    .bind(&m.product)
    .bind(&m.channel)
    .bind(m.version.to_string())
    .bind(version_code)
    .bind(&req.manifest)
    .bind(verified.payload_sha256().to_hex())
    .bind(m.payload.size as i64)
    .bind(m.payload.sha256.to_hex())
    .bind(m.index.id.to_hex())
    .bind(m.index.size as i64)
    .bind(i64::from(m.mandatory))
    .bind(salt.to_string())
    .bind(t)
    .bind(i64::from(plan.stages[0].basis_points()))
    .bind(serde_json::to_string(&plan).map_err(ApiError::internal)?)
    .bind(t)
    .bind(if plan.stages.len() == 1 { "completed" } else { "active" })
    .fetch_one(&state.db.pool)
    .await
    .map_err(|e| if is_unique_violation(&e) { ApiError::conflict("this version or version_code was just published") } else { e.into() })?;
    state.metrics.releases_published.fetch_add(1, Ordering::Relaxed);
    tracing::info!(release = id, product = %m.product, channel = %m.channel, version = %m.version, "release published");
    Ok((id, verified, plan))
}

pub(crate) async fn publish_release(
    State(state): State<AppState>,
    who: Principal,
    Json(req): Json<PublishRequest>,
) -> ApiResult<(StatusCode, Json<serde_json::Value>)> {
    if let Some(done) = republish_deltas(&state, &who, &req).await? {
        return Ok(done);
    }
    let (id, verified, plan) = publish(&state, &who, req, None).await?;
    let m = verified.manifest();
    let after = serde_json::json!({ "id": id, "version": m.version.to_string(), "version_code": m.version_code, "basis_points": plan.stages[0].basis_points() });
    audit(&state, &who.label, "publish", &format!("release:{id}"), None, Some(&after)).await?;
    state.cache.reload(&state.db).await?;
    Ok((
        StatusCode::CREATED,
        Json(
            serde_json::json!({ "id": id, "version": m.version.to_string(), "version_code": m.version_code, "state": "active", "basis_points": plan.stages[0].basis_points() }),
        ),
    ))
}

/// Every offered patch's index and chunks must be stored before a manifest lists it; the
/// index must describe `patch_size` bytes.
async fn check_deltas_stored(state: &AppState, m: &flotilla_core::manifest::Manifest) -> ApiResult<()> {
    for d in &m.deltas {
        let key = object_key(ObjectKind::Index, &d.patch_index.id.to_hex());
        let missing = || {
            ApiError::unprocessable(
                "delta_missing",
                format!("the patch index {} of the delta from {} is not uploaded", d.patch_index.id, d.from_version),
            )
        };
        let stored = state.store.get(&key, None).await?.ok_or_else(missing)?;
        let index = ChunkIndex::decode(&stored.bytes)
            .map_err(|e| ApiError::unprocessable("delta_rejected", format!("patch index refused: {e}")))?;
        if stored.bytes.len() as u64 != d.patch_index.size || index.image_size() != d.patch_size {
            return Err(ApiError::unprocessable(
                "delta_rejected",
                format!("the patch index of the delta from {} disagrees with the manifest's sizes", d.from_version),
            ));
        }
        let ids: Vec<String> = index.entries().iter().map(|e| e.id.to_hex()).collect();
        let present = stored_ids(state, ObjectKind::Chunk, &ids).await?;
        if ids.iter().any(|id| !present.contains(id)) {
            return Err(missing());
        }
    }
    Ok(())
}

/// A manifest for an already published version that differs from the stored one only in
/// `deltas` (`flotilla patch` adding a patch after the fact) replaces the stored manifest:
/// same release, version_code, payload and rollout. `None` when this is not such a request.
async fn republish_deltas(
    state: &AppState,
    who: &Principal,
    req: &PublishRequest,
) -> ApiResult<Option<(StatusCode, Json<serde_json::Value>)>> {
    who.require_publisher_of(&req.product)?;
    let Some(root) = state.cache.root(&req.product) else { return Ok(None) };
    let Ok(verified) = verify_signed(req.manifest.as_bytes(), &root, Timestamp::now()) else { return Ok(None) };
    let m = verified.manifest();
    if m.product != req.product {
        return Ok(None);
    }
    let row: Option<(i64, String)> =
        sqlx::query_as("SELECT id, manifest FROM releases WHERE product = $1 AND channel = $2 AND version = $3")
            .bind(&m.product)
            .bind(&m.channel)
            .bind(m.version.to_string())
            .fetch_optional(&state.db.pool)
            .await?;
    let Some((id, stored)) = row else { return Ok(None) };
    let Some(mut before) = crate::state::parse_stored_manifest(&stored) else { return Ok(None) };
    let mut after = m.clone();
    let (old_deltas, new_deltas) = (before.deltas.len(), after.deltas.len());
    // The same deltas again is no update: the normal path answers 409 (already published).
    let same_deltas = before.deltas == after.deltas;
    before.deltas.clear();
    after.deltas.clear();
    if same_deltas || before != after {
        return Ok(None);
    }
    check_deltas_stored(state, m).await?;
    sqlx::query("UPDATE releases SET manifest = $1, manifest_sha256 = $2 WHERE id = $3")
        .bind(&req.manifest)
        .bind(verified.payload_sha256().to_hex())
        .bind(id)
        .execute(&state.db.pool)
        .await?;
    audit(
        state,
        &who.label,
        "update_deltas",
        &format!("release:{id}"),
        Some(&serde_json::json!({ "deltas": old_deltas })),
        Some(&serde_json::json!({ "deltas": new_deltas })),
    )
    .await?;
    state.cache.reload(&state.db).await?;
    tracing::info!(release = id, deltas = new_deltas, "release manifest re-signed with other deltas");
    Ok(Some((
        StatusCode::OK,
        Json(
            serde_json::json!({ "id": id, "version": m.version.to_string(), "version_code": m.version_code, "deltas": new_deltas, "updated": true }),
        ),
    )))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RollbackRequest {
    /// A new manifest, signed by the publisher, for earlier content under a new version_code.
    manifest: String,
}

/// Halts release `id` and publishes earlier content again under a new version_code, to
/// everyone at once. Costs no upload: every chunk of the earlier release is stored.
pub(crate) async fn rollback(
    State(state): State<AppState>,
    who: Principal,
    Path(id): Path<i64>,
    Json(req): Json<RollbackRequest>,
) -> ApiResult<(StatusCode, Json<serde_json::Value>)> {
    let row: Option<(String, String, String)> =
        sqlx::query_as("SELECT product, channel, state FROM releases WHERE id = $1")
            .bind(id)
            .fetch_optional(&state.db.pool)
            .await?;
    let Some((product, channel, old_state)) = row else { return Err(ApiError::not_found(format!("no release {id}"))) };
    who.require_publisher_of(&product)?;
    let plan = StagePlan {
        stages: vec![Stage { percent: 100.0, min_reports: 0, max_failure_rate: 1.0, min_duration: Default::default() }],
        auto: false,
    };
    let (new_id, verified, _) = publish(
        &state,
        &who,
        PublishRequest { product: product.clone(), manifest: req.manifest, rollout: None },
        Some(plan),
    )
    .await?;
    let m = verified.manifest();
    let earlier: Option<i64> = sqlx::query_scalar("SELECT id FROM releases WHERE product = $1 AND channel = $2 AND image_sha256 = $3 AND id <> $4 ORDER BY version_code DESC LIMIT 1")
        .bind(&product)
        .bind(&channel)
        .bind(m.payload.sha256.to_hex())
        .bind(new_id)
        .fetch_optional(&state.db.pool)
        .await?;
    if m.channel != channel || earlier.is_none() {
        // Not a re-publication of earlier content on this channel: undo and refuse.
        sqlx::query("DELETE FROM releases WHERE id = $1").bind(new_id).execute(&state.db.pool).await?;
        return Err(ApiError::unprocessable(
            "not_a_rollback",
            "the rollback manifest must carry the image of an earlier release on the same channel",
        ));
    }
    sqlx::query("UPDATE releases SET state = 'halted', state_reason = $1 WHERE id = $2")
        .bind(format!("rolled back to release {} by {}", earlier.unwrap_or_default(), who.label))
        .bind(id)
        .execute(&state.db.pool)
        .await?;
    audit(
        &state,
        &who.label,
        "rollback",
        &format!("release:{id}"),
        Some(&serde_json::json!({ "state": old_state })),
        Some(&serde_json::json!({ "state": "halted", "replacement": new_id, "content_of": earlier })),
    )
    .await?;
    state.cache.reload(&state.db).await?;
    Ok((
        StatusCode::CREATED,
        Json(serde_json::json!({ "id": new_id, "version_code": m.version_code, "halted": id, "content_of": earlier })),
    ))
}
