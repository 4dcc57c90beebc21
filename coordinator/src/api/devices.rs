//! Device endpoints: enrollment, the update check (the hot path), and events.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Instant;

use axum::Json;
use axum::extract::{ConnectInfo, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use flotilla_core::manifest::is_valid_name;
use flotilla_core::rollout::{AssignedRelease, Assignment, ROLLOUT_SCHEMA_VERSION, in_rollout};
use flotilla_core::time::Timestamp;
use flotilla_core::version::{meets_minimum, parse_version};
use serde::{Deserialize, Serialize};
use sha2::Digest as _;

use crate::auth::{Principal, Scope, insert_token, new_token, token_hash};
use crate::db::now;
use crate::error::{ApiError, ApiResult};
use crate::state::{AppState, LastSeen, LiveRelease};

/// Enrollment request.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct EnrollRequest {
    device_id: String,
    product: String,
    channel: String,
    #[serde(default)]
    hardware: Option<String>,
    /// Operating system or app platform (`linux`, `android`, `ios`, …).
    #[serde(default)]
    platform: Option<String>,
    /// CPU architecture as Rust names it (`x86_64`, `aarch64`, …).
    #[serde(default)]
    architecture: Option<String>,
    #[serde(default)]
    version: Option<String>,
    #[serde(default)]
    version_code: Option<u64>,
    #[serde(default)]
    agent_version: Option<String>,
    #[serde(default)]
    native_version: Option<String>,
    #[serde(default)]
    enrollment_secret: Option<String>,
}

/// A release's target list admits the device: the list is empty (any), or names what the
/// device reported at enrollment. A device that reported nothing gets only untargeted releases,
/// as its agent would refuse the others.
fn targets(list: &[String], device: Option<&str>) -> bool {
    list.is_empty() || device.is_some_and(|d| list.iter().any(|t| t == d))
}

/// The client a rate limit counts: the TCP peer, or, behind a load balancer the operator
/// trusts (`trust_forwarded_for`), the address that proxy appended to `X-Forwarded-For` (the
/// last entry; earlier ones come from the client and prove nothing).
fn client_ip(state: &AppState, peer: SocketAddr, headers: &HeaderMap) -> std::net::IpAddr {
    if state.config.trust_forwarded_for
        && let Some(ip) = headers
            .get_all("x-forwarded-for")
            .iter()
            .next_back()
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.rsplit(',').next())
            .and_then(|v| v.trim().parse().ok())
    {
        return ip;
    }
    peer.ip()
}

fn valid_device_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= flotilla_core::rollout::MAX_DEVICE_ID_LEN
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b"._:-".contains(&b))
}

fn check_version(field: &str, v: &Option<String>) -> ApiResult<()> {
    if let Some(v) = v {
        parse_version(v).map_err(|e| ApiError::bad_request(format!("{field}: {e}")))?;
    }
    Ok(())
}

fn to_i64(field: &str, v: Option<u64>) -> ApiResult<Option<i64>> {
    v.map(|v| i64::try_from(v).map_err(|_| ApiError::bad_request(format!("{field} is too large")))).transpose()
}

pub(crate) async fn enroll(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Json(req): Json<EnrollRequest>,
) -> ApiResult<Response> {
    let client = client_ip(&state, peer, &headers);
    if !state.limiter.allow(client, "enroll", state.config.rate_limits.enrolls_per_minute) {
        state.metrics.rate_limited.fetch_add(1, Ordering::Relaxed);
        return Err(ApiError::rate_limited());
    }
    if !valid_device_id(&req.device_id) {
        return Err(ApiError::bad_request("device_id must be 1-128 characters of [A-Za-z0-9._:-]"));
    }
    for (field, v) in [
        ("product", Some(&req.product)),
        ("channel", Some(&req.channel)),
        ("hardware", req.hardware.as_ref()),
        ("platform", req.platform.as_ref()),
        ("architecture", req.architecture.as_ref()),
    ] {
        if let Some(v) = v
            && !is_valid_name(v)
        {
            return Err(ApiError::bad_request(format!("{field} must be 1-64 characters of [A-Za-z0-9._+-]")));
        }
    }
    check_version("version", &req.version)?;
    check_version("agent_version", &req.agent_version)?;
    check_version("native_version", &req.native_version)?;
    let version_code = to_i64("version_code", req.version_code)?;
    let secret_hash: Option<Option<String>> = sqlx::query_scalar("SELECT enroll_hash FROM products WHERE name = $1")
        .bind(&req.product)
        .fetch_optional(&state.db.pool)
        .await?;
    let Some(secret_hash) = secret_hash else {
        return Err(ApiError::not_found(format!("no product {:?}; create it first (POST /v1/products)", req.product)));
    };
    if !state.config.open_enrollment {
        let given = req.enrollment_secret.as_deref().map(|s| hex::encode(sha2::Sha256::digest(s.as_bytes())));
        match (secret_hash, given) {
            (Some(expected), Some(given)) if constant_time_eq(expected.as_bytes(), given.as_bytes()) => {}
            (None, _) => {
                return Err(ApiError::forbidden("enrollment is closed for this product: it has no enrollment secret"));
            }
            _ => return Err(ApiError::unauthorized("wrong or missing enrollment_secret for this product")),
        }
    }
    let t = now();
    let mut tx = state.db.begin_write().await?;
    // Re-enrolling replaces the device's record and revokes its older tokens.
    sqlx::query("DELETE FROM devices WHERE product = $1 AND device_id = $2")
        .bind(&req.product)
        .bind(&req.device_id)
        .execute(&mut *tx)
        .await?;
    sqlx::query(
        "INSERT INTO devices (product, device_id, channel, hardware, platform, architecture, version, version_code, agent_version, native_version, enrolled_at, last_seen) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
    )
    .bind(&req.product)
    .bind(&req.device_id)
    .bind(&req.channel)
    .bind(&req.hardware)
    .bind(&req.platform)
    .bind(&req.architecture)
    .bind(&req.version)
    .bind(version_code)
    .bind(&req.agent_version)
    .bind(&req.native_version)
    .bind(t)
    .bind(t)
    .execute(&mut *tx)
    .await?;
    sqlx::query("UPDATE tokens SET revoked = 1 WHERE scope = 'device' AND product = $1 AND device_id = $2")
        .bind(&req.product)
        .bind(&req.device_id)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    let token = new_token()?;
    insert_token(
        &state,
        &token,
        Scope::Device,
        Some(&req.product),
        Some(&req.device_id),
        &format!("device:{}", req.device_id),
    )
    .await?;
    state.metrics.enrollments.fetch_add(1, Ordering::Relaxed);
    tracing::info!(product = %req.product, device = %req.device_id, "device enrolled");
    Ok((StatusCode::CREATED, Json(serde_json::json!({ "token": token, "device_id": req.device_id }))).into_response())
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Query of an update check.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct CheckQuery {
    /// Installed version_code.
    #[serde(default)]
    version_code: Option<u64>,
    /// Random value echoed in the signed assignment.
    #[serde(default)]
    nonce: Option<String>,
    /// Native shell version (apps).
    #[serde(default)]
    native_version: Option<String>,
    /// Agent version.
    #[serde(default)]
    agent_version: Option<String>,
}

/// Answer of an update check that offers a release.
#[derive(Debug, Serialize)]
pub(crate) struct CheckResponse {
    release_id: i64,
    version: String,
    version_code: u64,
    mandatory: bool,
    /// The publisher-signed manifest envelope, verbatim.
    manifest: String,
    /// The coordinator-signed assignment envelope.
    assignment: String,
    index: IndexInfo,
    chunk_url_template: String,
    deltas: Vec<flotilla_core::manifest::Delta>,
    rollout: RolloutInfo,
}

#[derive(Debug, Serialize)]
struct IndexInfo {
    id: String,
    size: u64,
    url: String,
}

#[derive(Debug, Serialize)]
struct RolloutInfo {
    basis_points: u16,
    salt: String,
    state: String,
}

pub(crate) async fn check(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Query(q): Query<CheckQuery>,
) -> ApiResult<Response> {
    let started = Instant::now();
    if !state.limiter.allow(client_ip(&state, peer, &headers), "check", state.config.rate_limits.checks_per_minute) {
        state.metrics.rate_limited.fetch_add(1, Ordering::Relaxed);
        return Err(ApiError::rate_limited());
    }
    if q.nonce.as_ref().is_some_and(|n| n.len() > flotilla_core::rollout::MAX_NONCE_LEN) {
        return Err(ApiError::bad_request("nonce is longer than 128 characters"));
    }
    let native =
        q.native_version.as_deref().map(parse_version).transpose().map_err(|e| ApiError::bad_request(e.to_string()))?;
    let agent =
        q.agent_version.as_deref().map(parse_version).transpose().map_err(|e| ApiError::bad_request(e.to_string()))?;
    let installed = q.version_code;

    // The one indexed read of the hot path: token and device together.
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .filter(|t| t.len() <= 128)
        .ok_or_else(|| ApiError::unauthorized("missing Authorization: Bearer <device token>"))?;
    #[allow(clippy::type_complexity)]
    let row: Option<(String, String, String, Option<String>, Option<String>, Option<String>, Option<i64>, i64)> = sqlx::query_as(
        "SELECT t.product, t.device_id, d.channel, d.hardware, d.platform, d.architecture, t.expires_at, t.revoked FROM tokens t \
         JOIN devices d ON d.product = t.product AND d.device_id = t.device_id \
         WHERE t.hash = $1 AND t.scope = 'device'",
    )
    .bind(token_hash(token.trim()))
    .fetch_optional(&state.db.pool)
    .await?;
    let Some((product, device_id, channel, hardware, platform, architecture, expires_at, revoked)) = row else {
        return Err(ApiError::unauthorized("unknown device token; enroll again (POST /v1/devices/enroll)"));
    };
    if revoked != 0 || expires_at.is_some_and(|e| e <= now()) {
        return Err(ApiError::unauthorized("device token revoked or expired; enroll again"));
    }
    if let Ok(mut pending) = state.last_seen.lock() {
        pending.insert(
            (product.clone(), device_id.clone()),
            LastSeen { at: now(), version_code: installed.and_then(|v| i64::try_from(v).ok()) },
        );
    }

    let live = state.cache.live(&product, &channel);
    let mut native_too_old = None;
    let mut chosen: Option<&LiveRelease> = None;
    for r in live.iter() {
        let m = &r.manifest;
        if installed.is_some_and(|i| m.version_code <= i) {
            break; // newest first: nothing further down is newer
        }
        if !m.compatibility.hardware.is_empty()
            && !hardware.as_ref().is_some_and(|h| m.compatibility.hardware.contains(h))
        {
            continue;
        }
        if !targets(&m.compatibility.platforms, platform.as_deref())
            || !targets(&m.compatibility.architectures, architecture.as_deref())
        {
            continue;
        }
        if !in_rollout(&r.salt, &device_id, r.basis_points) {
            continue;
        }
        if let (Some(min), Some(have)) = (&m.compatibility.min_native_version, &native)
            && !meets_minimum(have, min)
        {
            native_too_old.get_or_insert_with(|| min.to_string());
            continue;
        }
        if let (Some(min), Some(have)) = (&m.compatibility.min_agent_version, &agent)
            && !meets_minimum(have, min)
        {
            continue;
        }
        chosen = Some(r);
        break;
    }
    let Some(r) = chosen else {
        state.metrics.checks_empty.fetch_add(1, Ordering::Relaxed);
        state.metrics.observe_check(started);
        if let Some(required) = native_too_old {
            return Ok(Json(serde_json::json!({
                "status": "native_too_old",
                "required_native_version": required,
                "message": "a newer release needs a newer app build; update the app from the store",
            }))
            .into_response());
        }
        return Ok(StatusCode::NO_CONTENT.into_response());
    };

    let etag = format!("\"r{}-{}\"", r.id, r.basis_points);
    if q.nonce.is_none() && headers.get(header::IF_NONE_MATCH).and_then(|v| v.to_str().ok()).is_some_and(|v| v == etag)
    {
        state.metrics.checks_empty.fetch_add(1, Ordering::Relaxed);
        state.metrics.observe_check(started);
        return Ok((StatusCode::NOT_MODIFIED, [(header::ETAG, etag)]).into_response());
    }
    let m = &r.manifest;
    let server_time = Timestamp::now();
    let assignment = Assignment {
        schema_version: ROLLOUT_SCHEMA_VERSION,
        device_id: device_id.clone(),
        nonce: q.nonce.clone().unwrap_or_default(),
        server_time,
        expires_at: server_time.saturating_add(state.config.check_response_ttl),
        product: product.clone(),
        channel: channel.clone(),
        release: Some(AssignedRelease {
            version: m.version.clone(),
            version_code: m.version_code,
            manifest_sha256: r.manifest_sha256,
            image_size: m.payload.size,
            image_sha256: m.payload.sha256,
            index_id: m.index.id,
        }),
        mandatory: m.mandatory,
    };
    let signed = assignment.sign(&[&state.rollout_key]).map_err(ApiError::internal)?;
    let body = CheckResponse {
        release_id: r.id,
        version: m.version.to_string(),
        version_code: m.version_code,
        mandatory: m.mandatory,
        manifest: r.manifest_json.to_string(),
        assignment: String::from_utf8_lossy(&signed.to_json()).into_owned(),
        index: IndexInfo { id: m.index.id.to_hex(), size: m.index.size, url: format!("/v1/indexes/{}", m.index.id) },
        chunk_url_template: "/v1/chunks/{id}".into(),
        deltas: r.deltas().to_vec(),
        rollout: RolloutInfo { basis_points: r.basis_points, salt: r.salt.to_string(), state: r.state.clone() },
    };
    state.metrics.checks_offered.fetch_add(1, Ordering::Relaxed);
    state.metrics.observe_check(started);
    Ok(([(header::ETAG, etag)], Json(body)).into_response())
}

/// Kinds of device event.
const EVENT_KINDS: &[&str] = &["downloading", "staged", "applied", "booted", "healthy", "failed", "rolled_back"];

/// One device event.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Event {
    /// The device's unique id for the event: an event re-sent with the same id is recorded once.
    #[serde(default)]
    id: Option<String>,
    kind: String,
    #[serde(default)]
    release_id: Option<i64>,
    #[serde(default)]
    version_code: Option<u64>,
    #[serde(default)]
    bytes: ByteSplit,
    #[serde(default)]
    detail: Option<String>,
}

/// Bytes of an install by source.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ByteSplit {
    #[serde(default)]
    peer: u64,
    #[serde(default)]
    cdn: u64,
    #[serde(default)]
    local: u64,
    #[serde(default)]
    delta: u64,
}

/// A batch of events (queued offline events arrive together).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct EventBatch {
    events: Vec<Event>,
}

/// Most events in one request.
const MAX_EVENTS: usize = 1000;

pub(crate) async fn events(
    State(state): State<AppState>,
    who: Principal,
    Json(batch): Json<EventBatch>,
) -> ApiResult<StatusCode> {
    let (product, device_id) = who.require_device()?;
    if batch.events.len() > MAX_EVENTS {
        return Err(ApiError::bad_request(format!("at most {MAX_EVENTS} events per request")));
    }
    let mut tx = state.db.begin_write().await?;
    for e in &batch.events {
        if !EVENT_KINDS.contains(&e.kind.as_str()) {
            return Err(ApiError::bad_request(format!("event kind must be one of {EVENT_KINDS:?}")));
        }
        if e.detail.as_ref().is_some_and(|d| d.len() > 4096) {
            return Err(ApiError::bad_request("event detail is longer than 4096 bytes"));
        }
        if e.id.as_ref().is_some_and(|id| {
            id.is_empty() || id.len() > 64 || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        }) {
            return Err(ApiError::bad_request("event id must be 1-64 characters of [A-Za-z0-9._-]"));
        }
        let as_i64 = |v: u64| i64::try_from(v).map_err(|_| ApiError::bad_request("byte counts must fit in i64"));
        // Resolve the release by version_code within the device's product when no id is given;
        // an id from another product is refused, not recorded.
        let release_id: Option<i64> = match (e.release_id, e.version_code) {
            (Some(id), _) => Some(
                sqlx::query_scalar("SELECT id FROM releases WHERE id = $1 AND product = $2")
                    .bind(id)
                    .bind(product)
                    .fetch_optional(&mut *tx)
                    .await?
                    .ok_or_else(|| ApiError::not_found(format!("no release {id} in product {product:?}")))?,
            ),
            (None, Some(code)) => {
                sqlx::query_scalar(
                    "SELECT r.id FROM releases r JOIN devices d ON d.product = r.product AND d.channel = r.channel \
                 WHERE d.product = $1 AND d.device_id = $2 AND r.version_code = $3",
                )
                .bind(product)
                .bind(device_id)
                .bind(as_i64(code)?)
                .fetch_optional(&mut *tx)
                .await?
            }
            (None, None) => None,
        };
        // ON CONFLICT: an id already recorded (a batch re-sent after a lost answer) is skipped.
        let inserted = sqlx::query(
            "INSERT INTO events (release_id, product, device_id, kind, bytes_peer, bytes_cdn, bytes_local, bytes_delta, detail, created_at, event_uid) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) ON CONFLICT DO NOTHING",
        )
        .bind(release_id)
        .bind(product)
        .bind(device_id)
        .bind(&e.kind)
        .bind(as_i64(e.bytes.peer)?)
        .bind(as_i64(e.bytes.cdn)?)
        .bind(as_i64(e.bytes.local)?)
        .bind(as_i64(e.bytes.delta)?)
        .bind(&e.detail)
        .bind(now())
        .bind(&e.id)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if inserted == 0 {
            continue;
        }
        if e.kind == "healthy"
            && let Some(id) = release_id
        {
            sqlx::query(
                "UPDATE devices SET version = (SELECT version FROM releases WHERE id = $1), \
                 version_code = (SELECT version_code FROM releases WHERE id = $1) WHERE product = $2 AND device_id = $3",
            )
            .bind(id)
            .bind(product)
            .bind(device_id)
            .execute(&mut *tx)
            .await?;
        }
    }
    tx.commit().await?;
    state.metrics.events.fetch_add(batch.events.len() as u64, Ordering::Relaxed);
    Ok(StatusCode::ACCEPTED)
}

/// Devices per last-seen UPDATE: four bound values each, well under SQLite's and
/// PostgreSQL's limits on bound parameters.
const LAST_SEEN_BATCH: usize = 500;

/// Writes batched last-seen times: one UPDATE per 500 devices, one transaction per flush.
/// (A statement per device kept a connection and a core busy for ~100 ms per 1 000 devices,
/// which showed in the update check's tail latency.)
///
/// # Errors
/// Database errors; the batch is dropped (it is only last-seen).
pub async fn flush_last_seen(state: &AppState) -> Result<usize, sqlx::Error> {
    let pending: Vec<_> = match state.last_seen.lock() {
        Ok(mut m) => m.drain().collect(),
        Err(_) => return Ok(0),
    };
    if pending.is_empty() {
        return Ok(0);
    }
    let mut tx = state.db.begin_write().await?;
    for batch in pending.chunks(LAST_SEEN_BATCH) {
        let rows: Vec<String> = (0..batch.len())
            .map(|i| format!("(${}, ${}, ${}, ${})", 4 * i + 1, 4 * i + 2, 4 * i + 3, 4 * i + 4))
            .collect();
        // Only numbered placeholders are formatted in; every value is bound.
        let sql = format!(
            "WITH seen (at, version_code, product, device_id) AS (VALUES {}) \
             UPDATE devices SET last_seen = seen.at, version_code = COALESCE(seen.version_code, devices.version_code) \
             FROM seen WHERE devices.product = seen.product AND devices.device_id = seen.device_id",
            rows.join(", ")
        );
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
        for ((product, device), seen) in batch {
            q = q.bind(seen.at).bind(seen.version_code).bind(product).bind(device);
        }
        q.execute(&mut *tx).await?;
    }
    tx.commit().await?;
    Ok(pending.len())
}
