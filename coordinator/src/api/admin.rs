//! Operator and account endpoints: products, tokens, releases with live rollout figures,
//! rollout control, devices, statistics, the audit log.

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use flotilla_core::manifest::is_valid_name;
use flotilla_core::trust::TrustRoot;
use serde::Deserialize;
use sha2::Digest as _;
use sqlx::Row as _;

use crate::auth::{Principal, Scope, insert_token, new_token, token_hash};
use crate::config::{Stage, validate_stages};
use crate::db::{is_unique_violation, now};
use crate::error::{ApiError, ApiResult};
use crate::rollout::{self, Action, StagePlan, audit};
use crate::state::AppState;

type JsonValue = Json<serde_json::Value>;

/// Lifetime of tokens from `/v1/auth/token` and `/v1/auth/refresh`.
const SESSION_TOKEN_SECS: i64 = 3600;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct CreateProduct {
    name: String,
    /// Trust-root envelope (JSON string), self-signed by its root threshold.
    trust_root: String,
    #[serde(default)]
    enrollment_secret: Option<String>,
    #[serde(default)]
    stages: Option<Vec<Stage>>,
}

/// Creates a product (the seeds' `POST /apps`) and returns its first publish token (the API key).
pub(crate) async fn create_product(
    State(state): State<AppState>,
    who: Principal,
    Json(req): Json<CreateProduct>,
) -> ApiResult<(StatusCode, JsonValue)> {
    who.require_admin()?;
    if !is_valid_name(&req.name) {
        return Err(ApiError::bad_request("product names are 1-64 characters of [A-Za-z0-9._+-]"));
    }
    TrustRoot::from_trusted_json(req.trust_root.as_bytes())
        .map_err(|e| ApiError::unprocessable("trust_root_rejected", format!("trust root refused: {e}")))?;
    if req.enrollment_secret.as_ref().is_some_and(|s| s.len() < 16 || s.len() > 256) {
        return Err(ApiError::bad_request("enrollment_secret must be 16-256 characters"));
    }
    let plan = match &req.stages {
        Some(stages) => {
            validate_stages(stages).map_err(ApiError::bad_request)?;
            Some(serde_json::to_string(&StagePlan { stages: stages.clone(), auto: true }).map_err(ApiError::internal)?)
        }
        None => None,
    };
    let enroll_hash = req.enrollment_secret.as_deref().map(|s| hex::encode(sha2::Sha256::digest(s.as_bytes())));
    sqlx::query(
        "INSERT INTO products (name, trust_root, enroll_hash, stage_plan, created_at) VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(&req.name)
    .bind(&req.trust_root)
    .bind(enroll_hash)
    .bind(plan)
    .bind(now())
    .execute(&state.db.pool)
    .await
    .map_err(|e| {
        if is_unique_violation(&e) { ApiError::conflict(format!("product {:?} exists", req.name)) } else { e.into() }
    })?;
    let api_key = new_token()?;
    insert_token(&state, &api_key, Scope::Publish, Some(&req.name), None, &format!("publish:{}", req.name)).await?;
    audit(
        &state,
        &who.label,
        "create_product",
        &format!("product:{}", req.name),
        None,
        Some(&serde_json::json!({ "name": req.name })),
    )
    .await?;
    state.cache.reload(&state.db).await?;
    Ok((StatusCode::CREATED, Json(serde_json::json!({ "name": req.name, "api_key": api_key }))))
}

pub(crate) async fn list_products(State(state): State<AppState>, who: Principal) -> ApiResult<JsonValue> {
    who.require_admin()?;
    let rows = sqlx::query("SELECT name, created_at, stage_plan FROM products ORDER BY name")
        .fetch_all(&state.db.pool)
        .await?;
    let mut out = Vec::new();
    for r in rows {
        let plan: Option<String> = r.try_get("stage_plan")?;
        out.push(serde_json::json!({
            "name": r.try_get::<String, _>("name")?,
            "created_at": r.try_get::<i64, _>("created_at")?,
            "stages": plan.and_then(|p| serde_json::from_str::<serde_json::Value>(&p).ok()),
        }));
    }
    Ok(Json(serde_json::json!({ "products": out })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct StagesRequest {
    stages: Vec<Stage>,
}

pub(crate) async fn set_stage_plan(
    State(state): State<AppState>,
    who: Principal,
    Path(product): Path<String>,
    Json(req): Json<StagesRequest>,
) -> ApiResult<JsonValue> {
    who.require_publisher_of(&product)?;
    validate_stages(&req.stages).map_err(ApiError::bad_request)?;
    let plan = serde_json::to_string(&StagePlan { stages: req.stages, auto: true }).map_err(ApiError::internal)?;
    let before: Option<Option<String>> = sqlx::query_scalar("SELECT stage_plan FROM products WHERE name = $1")
        .bind(&product)
        .fetch_optional(&state.db.pool)
        .await?;
    let Some(before) = before else { return Err(ApiError::not_found(format!("no product {product:?}"))) };
    sqlx::query("UPDATE products SET stage_plan = $1 WHERE name = $2")
        .bind(&plan)
        .bind(&product)
        .execute(&state.db.pool)
        .await?;
    let parse = |s: &str| serde_json::from_str::<serde_json::Value>(s).ok();
    audit(
        &state,
        &who.label,
        "set_stages",
        &format!("product:{product}"),
        before.as_deref().and_then(parse).as_ref(),
        parse(&plan).as_ref(),
    )
    .await?;
    Ok(Json(serde_json::json!({ "product": product, "plan": parse(&plan) })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct CreateToken {
    scope: String,
    #[serde(default)]
    product: Option<String>,
    label: String,
    /// Lifetime in seconds; none means until revoked.
    #[serde(default)]
    expires_in: Option<u64>,
}

pub(crate) async fn create_token(
    State(state): State<AppState>,
    who: Principal,
    Json(req): Json<CreateToken>,
) -> ApiResult<(StatusCode, JsonValue)> {
    who.require_admin()?;
    let scope = match req.scope.as_str() {
        "publish" => Scope::Publish,
        "cache" => Scope::Cache,
        "admin" => Scope::Admin,
        _ => {
            return Err(ApiError::bad_request(
                "scope must be publish, cache or admin (devices get tokens by enrolling)",
            ));
        }
    };
    if matches!(scope, Scope::Publish | Scope::Cache) && req.product.is_none() {
        return Err(ApiError::bad_request(format!("a {} token needs a product", scope.as_str())));
    }
    if req.label.is_empty() || req.label.len() > 128 {
        return Err(ApiError::bad_request("label must be 1-128 characters"));
    }
    let token = new_token()?;
    insert_token(&state, &token, scope, req.product.as_deref(), None, &req.label).await?;
    if let Some(secs) = req.expires_in {
        let secs = i64::try_from(secs).map_err(|_| ApiError::bad_request("expires_in too large"))?;
        sqlx::query("UPDATE tokens SET expires_at = $1 WHERE hash = $2")
            .bind(now().saturating_add(secs))
            .bind(token_hash(&token))
            .execute(&state.db.pool)
            .await?;
    }
    audit(
        &state,
        &who.label,
        "create_token",
        &format!("token:{}", req.label),
        None,
        Some(&serde_json::json!({ "scope": req.scope, "product": req.product })),
    )
    .await?;
    Ok((StatusCode::CREATED, Json(serde_json::json!({ "token": token }))))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ExchangeRequest {
    api_key: String,
}

/// Exchanges a long-lived API key for a one-hour session token of the same scope.
pub(crate) async fn exchange_token(
    State(state): State<AppState>,
    Json(req): Json<ExchangeRequest>,
) -> ApiResult<JsonValue> {
    if req.api_key.len() > 128 {
        return Err(ApiError::unauthorized("unknown API key"));
    }
    let row: Option<(String, Option<String>, String, Option<i64>, i64)> = sqlx::query_as(
        "SELECT scope, product, label, expires_at, revoked FROM tokens WHERE hash = $1 AND scope <> 'device'",
    )
    .bind(token_hash(&req.api_key))
    .fetch_optional(&state.db.pool)
    .await?;
    let Some((scope, product, label, expires_at, revoked)) = row else {
        return Err(ApiError::unauthorized("unknown API key"));
    };
    if revoked != 0 || expires_at.is_some_and(|e| e <= now()) {
        return Err(ApiError::unauthorized("API key revoked or expired"));
    }
    session_token(&state, &scope, product.as_deref(), &label).await
}

async fn session_token(state: &AppState, scope: &str, product: Option<&str>, label: &str) -> ApiResult<JsonValue> {
    let token = new_token()?;
    sqlx::query("INSERT INTO tokens (hash, scope, product, device_id, label, created_at, expires_at, revoked) VALUES ($1, $2, $3, NULL, $4, $5, $6, 0)")
        .bind(token_hash(&token))
        .bind(scope)
        .bind(product)
        .bind(label)
        .bind(now())
        .bind(now() + SESSION_TOKEN_SECS)
        .execute(&state.db.pool)
        .await?;
    Ok(Json(serde_json::json!({ "token": token, "expires_in": SESSION_TOKEN_SECS })))
}

/// Trades a valid session token for a fresh one and revokes the old one.
pub(crate) async fn refresh_token(
    State(state): State<AppState>,
    who: Principal,
    headers: axum::http::HeaderMap,
) -> ApiResult<JsonValue> {
    if who.scope == Scope::Device {
        return Err(ApiError::forbidden("device tokens are renewed by enrolling again"));
    }
    let old = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default();
    let fresh = session_token(&state, who.scope.as_str(), who.product.as_deref(), &who.label).await?;
    sqlx::query("UPDATE tokens SET revoked = 1 WHERE hash = $1 AND expires_at IS NOT NULL")
        .bind(token_hash(old.trim()))
        .execute(&state.db.pool)
        .await?;
    Ok(fresh)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ListQuery {
    #[serde(default)]
    product: Option<String>,
    #[serde(default)]
    channel: Option<String>,
    #[serde(default)]
    include_archived: bool,
    #[serde(default)]
    limit: Option<u32>,
}

fn visible_product(who: &Principal, asked: Option<&String>) -> ApiResult<Option<String>> {
    match who.scope {
        Scope::Admin => Ok(asked.cloned()),
        Scope::Publish | Scope::Cache => {
            let own = who.product.clone();
            if asked.is_some_and(|a| Some(a) != own.as_ref()) {
                return Err(ApiError::forbidden("this token may only see its own product"));
            }
            Ok(own)
        }
        Scope::Device => Err(ApiError::forbidden("device tokens cannot list releases")),
    }
}

async fn release_json(state: &AppState, row: &sqlx::any::AnyRow) -> ApiResult<serde_json::Value> {
    let id: i64 = row.try_get("id")?;
    let stage_started: i64 = row.try_get("stage_started")?;
    let (healthy, failed) = rollout::reports(state, id, 0).await?;
    let (stage_healthy, stage_failed) = rollout::reports(state, id, stage_started).await?;
    let bytes = sqlx::query(
        "SELECT CAST(COALESCE(SUM(bytes_peer), 0) AS BIGINT) AS peer, CAST(COALESCE(SUM(bytes_cdn), 0) AS BIGINT) AS cdn, CAST(COALESCE(SUM(bytes_local), 0) AS BIGINT) AS local, \
         CAST(COALESCE(SUM(bytes_delta), 0) AS BIGINT) AS delta FROM events WHERE release_id = $1",
    )
    .bind(id)
    .fetch_one(&state.db.pool)
    .await?;
    let total = healthy + failed;
    let plan: String = row.try_get("stage_plan")?;
    Ok(serde_json::json!({
        "id": id,
        "product": row.try_get::<String, _>("product")?,
        "channel": row.try_get::<String, _>("channel")?,
        "version": row.try_get::<String, _>("version")?,
        "version_code": row.try_get::<i64, _>("version_code")?,
        "mandatory": row.try_get::<i64, _>("mandatory")? != 0,
        "archived": row.try_get::<i64, _>("archived")? != 0,
        "created_at": row.try_get::<i64, _>("created_at")?,
        "image_size": row.try_get::<i64, _>("image_size")?,
        "image_sha256": row.try_get::<String, _>("image_sha256")?,
        "index_id": row.try_get::<String, _>("index_id")?,
        "rollout": {
            "state": row.try_get::<String, _>("state")?,
            "reason": row.try_get::<Option<String>, _>("state_reason")?,
            "stage": row.try_get::<i64, _>("stage")?,
            "percent": row.try_get::<i64, _>("basis_points")? as f64 / 100.0,
            "stage_started": stage_started,
            "plan": serde_json::from_str::<serde_json::Value>(&plan).ok(),
            "reports": total,
            "healthy": healthy,
            "failed": failed,
            "failure_rate": if total > 0 { failed as f64 / total as f64 } else { 0.0 },
            "stage_reports": stage_healthy + stage_failed,
        },
        "bytes": {
            "peer": bytes.try_get::<i64, _>("peer")?,
            "cdn": bytes.try_get::<i64, _>("cdn")?,
            "local": bytes.try_get::<i64, _>("local")?,
            "delta": bytes.try_get::<i64, _>("delta")?,
        },
    }))
}

const RELEASE_COLUMNS: &str = "id, product, channel, version, version_code, mandatory, archived, created_at, image_size, \
    image_sha256, index_id, state, state_reason, stage, basis_points, stage_started, stage_plan";

pub(crate) async fn list_releases(
    State(state): State<AppState>,
    who: Principal,
    Query(q): Query<ListQuery>,
) -> ApiResult<JsonValue> {
    let product = visible_product(&who, q.product.as_ref())?;
    let limit = i64::from(q.limit.unwrap_or(100).min(1000));
    let sql = format!(
        "SELECT {RELEASE_COLUMNS} FROM releases WHERE ($1 = '' OR product = $1) AND ($2 = '' OR channel = $2) \
         AND ($3 = 1 OR archived = 0) ORDER BY product, channel, version_code DESC LIMIT $4"
    );
    // Only fixed column names are formatted in; every value is bound.
    let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(product.unwrap_or_default())
        .bind(q.channel.unwrap_or_default())
        .bind(i64::from(q.include_archived))
        .bind(limit)
        .fetch_all(&state.db.pool)
        .await?;
    let mut out = Vec::with_capacity(rows.len());
    for r in &rows {
        out.push(release_json(&state, r).await?);
    }
    Ok(Json(serde_json::json!({ "releases": out })))
}

/// Loads release `id` for `who`: reading it (publish and cache tokens of its product) or
/// steering it (publish tokens).
async fn release_row(state: &AppState, who: &Principal, id: i64, read_only: bool) -> ApiResult<sqlx::any::AnyRow> {
    let row = sqlx::query(sqlx::AssertSqlSafe(format!("SELECT {RELEASE_COLUMNS} FROM releases WHERE id = $1")))
        .bind(id)
        .fetch_optional(&state.db.pool)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no release {id}")))?;
    let product: String = row.try_get("product")?;
    if read_only {
        who.require_reader_of(&product)?
    } else {
        who.require_publisher_of(&product)?
    }
    Ok(row)
}

pub(crate) async fn get_release(
    State(state): State<AppState>,
    who: Principal,
    Path(id): Path<i64>,
) -> ApiResult<JsonValue> {
    let row = release_row(&state, &who, id, true).await?;
    let mut out = release_json(&state, &row).await?;
    // The signed manifest, verbatim: the CLI needs it for rollback and export.
    let manifest: String =
        sqlx::query_scalar("SELECT manifest FROM releases WHERE id = $1").bind(id).fetch_one(&state.db.pool).await?;
    out["manifest"] = serde_json::Value::String(manifest);
    Ok(Json(out))
}

/// A product with its trust root (for exports and tooling).
pub(crate) async fn get_product(
    State(state): State<AppState>,
    who: Principal,
    Path(product): Path<String>,
) -> ApiResult<JsonValue> {
    who.require_publisher_of(&product)?;
    let row: Option<(String, i64)> = sqlx::query_as("SELECT trust_root, created_at FROM products WHERE name = $1")
        .bind(&product)
        .fetch_optional(&state.db.pool)
        .await?;
    let Some((trust_root, created_at)) = row else {
        return Err(ApiError::not_found(format!("no product {product:?}")));
    };
    Ok(Json(serde_json::json!({ "name": product, "trust_root": trust_root, "created_at": created_at })))
}

pub(crate) async fn release_stats(
    State(state): State<AppState>,
    who: Principal,
    Path(id): Path<i64>,
) -> ApiResult<JsonValue> {
    release_row(&state, &who, id, false).await?;
    let rows = sqlx::query("SELECT kind, COUNT(*) AS n, COUNT(DISTINCT device_id) AS devices FROM events WHERE release_id = $1 GROUP BY kind ORDER BY kind")
        .bind(id)
        .fetch_all(&state.db.pool)
        .await?;
    let mut by_kind = serde_json::Map::new();
    for r in rows {
        by_kind.insert(
            r.try_get("kind")?,
            serde_json::json!({ "events": r.try_get::<i64, _>("n")?, "devices": r.try_get::<i64, _>("devices")? }),
        );
    }
    Ok(Json(serde_json::json!({ "release": id, "events": by_kind })))
}

pub(crate) async fn archive_release(
    State(state): State<AppState>,
    who: Principal,
    Path(id): Path<i64>,
) -> ApiResult<JsonValue> {
    release_row(&state, &who, id, false).await?;
    sqlx::query("UPDATE releases SET archived = 1 WHERE id = $1").bind(id).execute(&state.db.pool).await?;
    audit(
        &state,
        &who.label,
        "archive",
        &format!("release:{id}"),
        Some(&serde_json::json!({ "archived": false })),
        Some(&serde_json::json!({ "archived": true })),
    )
    .await?;
    state.cache.reload(&state.db).await?;
    Ok(Json(serde_json::json!({ "id": id, "archived": true })))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ReasonBody {
    #[serde(default)]
    reason: Option<String>,
}

async fn act(state: AppState, who: Principal, id: i64, action: Action) -> ApiResult<JsonValue> {
    release_row(&state, &who, id, false).await?;
    let next = rollout::apply(&state, &who.label, id, action).await?;
    Ok(Json(serde_json::to_value(next).map_err(ApiError::internal)?))
}

fn reason(body: Option<Json<ReasonBody>>, default: &str) -> ApiResult<String> {
    let r = body.and_then(|b| b.0.reason).unwrap_or_else(|| default.to_owned());
    if r.len() > 512 {
        return Err(ApiError::bad_request("reason is longer than 512 characters"));
    }
    Ok(r)
}

pub(crate) async fn pause(
    State(state): State<AppState>,
    who: Principal,
    Path(id): Path<i64>,
    body: Option<Json<ReasonBody>>,
) -> ApiResult<JsonValue> {
    let r = reason(body, &format!("paused by {}", who.label))?;
    act(state, who, id, Action::Pause(r)).await
}

pub(crate) async fn resume(State(state): State<AppState>, who: Principal, Path(id): Path<i64>) -> ApiResult<JsonValue> {
    act(state, who, id, Action::Resume).await
}

pub(crate) async fn advance(
    State(state): State<AppState>,
    who: Principal,
    Path(id): Path<i64>,
) -> ApiResult<JsonValue> {
    act(state, who, id, Action::Advance).await
}

pub(crate) async fn halt(
    State(state): State<AppState>,
    who: Principal,
    Path(id): Path<i64>,
    body: Option<Json<ReasonBody>>,
) -> ApiResult<JsonValue> {
    let r = reason(body, &format!("halted by {}", who.label))?;
    act(state, who, id, Action::Halt(r)).await
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PercentBody {
    percent: f64,
}

pub(crate) async fn set_percentage(
    State(state): State<AppState>,
    who: Principal,
    Path(id): Path<i64>,
    Json(b): Json<PercentBody>,
) -> ApiResult<JsonValue> {
    if !(0.0..=100.0).contains(&b.percent) || !b.percent.is_finite() {
        return Err(ApiError::bad_request("percent must be between 0 and 100"));
    }
    act(state, who, id, Action::SetBasisPoints((b.percent * 100.0).round() as u16)).await
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct DeviceQuery {
    #[serde(default)]
    product: Option<String>,
    #[serde(default)]
    limit: Option<u32>,
}

pub(crate) async fn list_devices(
    State(state): State<AppState>,
    who: Principal,
    Query(q): Query<DeviceQuery>,
) -> ApiResult<JsonValue> {
    if who.scope == Scope::Cache {
        return Err(ApiError::forbidden("cache tokens may read releases only"));
    }
    let product = visible_product(&who, q.product.as_ref())?;
    let rows = sqlx::query(
        "SELECT product, device_id, channel, hardware, platform, architecture, version, version_code, agent_version, last_seen, enrolled_at FROM devices \
         WHERE ($1 = '' OR product = $1) ORDER BY product, device_id LIMIT $2",
    )
    .bind(product.unwrap_or_default())
    .bind(i64::from(q.limit.unwrap_or(1000).min(10_000)))
    .fetch_all(&state.db.pool)
    .await?;
    let mut out = Vec::with_capacity(rows.len());
    for r in rows {
        out.push(serde_json::json!({
            "product": r.try_get::<String, _>("product")?,
            "device_id": r.try_get::<String, _>("device_id")?,
            "channel": r.try_get::<String, _>("channel")?,
            "hardware": r.try_get::<Option<String>, _>("hardware")?,
            "platform": r.try_get::<Option<String>, _>("platform")?,
            "architecture": r.try_get::<Option<String>, _>("architecture")?,
            "version": r.try_get::<Option<String>, _>("version")?,
            "version_code": r.try_get::<Option<i64>, _>("version_code")?,
            "agent_version": r.try_get::<Option<String>, _>("agent_version")?,
            "last_seen": r.try_get::<i64, _>("last_seen")?,
            "enrolled_at": r.try_get::<i64, _>("enrolled_at")?,
        }));
    }
    Ok(Json(serde_json::json!({ "devices": out })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct AuditQuery {
    #[serde(default)]
    limit: Option<u32>,
}

pub(crate) async fn audit_log(
    State(state): State<AppState>,
    who: Principal,
    Query(q): Query<AuditQuery>,
) -> ApiResult<JsonValue> {
    who.require_admin()?;
    let rows =
        sqlx::query("SELECT id, actor, action, target, before, after, created_at FROM audit ORDER BY id DESC LIMIT $1")
            .bind(i64::from(q.limit.unwrap_or(100).min(10_000)))
            .fetch_all(&state.db.pool)
            .await?;
    let parse = |s: Option<String>| s.and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok());
    let mut out = Vec::new();
    for r in rows {
        out.push(serde_json::json!({
            "id": r.try_get::<i64, _>("id")?,
            "actor": r.try_get::<String, _>("actor")?,
            "action": r.try_get::<String, _>("action")?,
            "target": r.try_get::<String, _>("target")?,
            "before": parse(r.try_get("before")?),
            "after": parse(r.try_get("after")?),
            "at": r.try_get::<i64, _>("created_at")?,
        }));
    }
    Ok(Json(serde_json::json!({ "entries": out })))
}
