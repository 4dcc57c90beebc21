//! Trust-root rotation: an operator pushes version N+1 (signed by the current root threshold
//! and the new one); the coordinator checks it as a device would and keeps the whole chain, so
//! a device holding version N can fetch N+1, N+2, ... and verify each step itself.

use axum::Json;
use axum::extract::{Path, Query, State};
use flotilla_core::trust::{Role, TrustRoot};
use serde::Deserialize;
use sqlx::Row as _;

use crate::auth::Principal;
use crate::db::now;
use crate::error::{ApiError, ApiResult};
use crate::rollout::audit;
use crate::state::AppState;

/// Largest trust-root envelope accepted (a root lists keys, not content).
const MAX_ROOT_BYTES: usize = 256 << 10;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RotateRequest {
    /// The next trust root's DSSE envelope (JSON text), from `flotilla root rotate`.
    trust_root: String,
}

/// `PUT /v1/products/{product}/trust-root` (admin): replaces the product's trust root with its
/// successor. Refused unless the current root accepts the rotation (version N+1, signed by the
/// current and the new root thresholds) and the new root still lists this coordinator's rollout
/// key. Releases published afterwards are checked against the new root.
pub(crate) async fn rotate(
    State(state): State<AppState>,
    who: Principal,
    Path(product): Path<String>,
    Json(req): Json<RotateRequest>,
) -> ApiResult<Json<serde_json::Value>> {
    who.require_admin()?;
    if req.trust_root.len() > MAX_ROOT_BYTES {
        return Err(ApiError::bad_request(format!("trust_root is larger than {MAX_ROOT_BYTES} bytes")));
    }
    let current_json: Option<String> = sqlx::query_scalar("SELECT trust_root FROM products WHERE name = $1")
        .bind(&product)
        .fetch_optional(&state.db.pool)
        .await?;
    let Some(current_json) = current_json else {
        return Err(ApiError::not_found(format!("no product {product:?}")));
    };
    let current = TrustRoot::from_trusted_json(current_json.as_bytes()).map_err(ApiError::internal)?;
    let next = current
        .rotate(req.trust_root.as_bytes())
        .map_err(|e| ApiError::unprocessable("trust_root_rejected", format!("rotation refused: {e}")))?;
    let rollout_id = state.rollout_key.public_key().key_id();
    if !next.is_in_role(&rollout_id, Role::Rollout) {
        return Err(ApiError::unprocessable(
            "trust_root_rejected",
            format!(
                "the new trust root does not list this coordinator's rollout key {rollout_id}, so devices would refuse \
                 every update check; keep the rollout role when rotating"
            ),
        ));
    }

    let t = now();
    let mut tx = state.db.begin_write().await?;
    let swapped = sqlx::query("UPDATE products SET trust_root = $1 WHERE name = $2 AND trust_root = $3")
        .bind(&req.trust_root)
        .bind(&product)
        .bind(&current_json)
        .execute(&mut *tx)
        .await?;
    if swapped.rows_affected() != 1 {
        return Err(ApiError::conflict("the trust root changed meanwhile; fetch the current one and rotate from it"));
    }
    for (version, envelope) in [(current.version(), &current_json), (next.version(), &req.trust_root)] {
        sqlx::query(
            "INSERT INTO trust_roots (product, version, envelope, created_at) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (product, version) DO NOTHING",
        )
        .bind(&product)
        .bind(i64::try_from(version).map_err(ApiError::internal)?)
        .bind(envelope)
        .bind(t)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    audit(
        &state,
        &who.label,
        "rotate_trust_root",
        &format!("product:{product}"),
        Some(&serde_json::json!({ "version": current.version() })),
        Some(&serde_json::json!({ "version": next.version() })),
    )
    .await?;
    state.cache.reload(&state.db).await?;
    Ok(Json(serde_json::json!({
        "product": product,
        "version": next.version(),
        "previous_version": current.version(),
    })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ChainQuery {
    /// The version the caller already trusts.
    #[serde(default)]
    after: u64,
}

/// `GET /v1/products/{product}/trust-roots?after=N` (devices of the product, its publishers,
/// admins): every root after version N, oldest first, for the caller to verify step by step.
pub(crate) async fn chain(
    State(state): State<AppState>,
    who: Principal,
    Path(product): Path<String>,
    Query(q): Query<ChainQuery>,
) -> ApiResult<Json<serde_json::Value>> {
    let device_of_product = who.require_device().is_ok_and(|(p, _)| p == product);
    if !device_of_product {
        who.require_publisher_of(&product)?;
    }
    let after = i64::try_from(q.after).map_err(|_| ApiError::bad_request("after is too large"))?;
    let rows =
        sqlx::query("SELECT version, envelope FROM trust_roots WHERE product = $1 AND version > $2 ORDER BY version")
            .bind(&product)
            .bind(after)
            .fetch_all(&state.db.pool)
            .await?;
    let mut roots = Vec::with_capacity(rows.len());
    for r in rows {
        roots.push(serde_json::json!({
            "version": r.try_get::<i64, _>("version")?,
            "trust_root": r.try_get::<String, _>("envelope")?,
        }));
    }
    let current = state.cache.root(&product).map(|r| r.version());
    Ok(Json(serde_json::json!({ "product": product, "current_version": current, "trust_roots": roots })))
}
