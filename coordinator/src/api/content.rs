//! The embedded CDN origin: content-addressed objects with Range, strong ETags and
//! `Cache-Control: immutable`, or redirects to a configured CDN base URL. Objects are public
//! by design (like a CDN): they are addressed by hash and useless without a signed manifest.

use std::sync::atomic::Ordering;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::error::{ApiError, ApiResult};
use crate::state::AppState;
use crate::storage::{ObjectKind, ObjectStore as _, object_key};

pub(crate) async fn get_chunk(
    state: State<AppState>,
    id: Path<String>,
    method: Method,
    headers: HeaderMap,
) -> ApiResult<Response> {
    serve(state, ObjectKind::Chunk, id, method, headers).await
}

pub(crate) async fn get_index(
    state: State<AppState>,
    id: Path<String>,
    method: Method,
    headers: HeaderMap,
) -> ApiResult<Response> {
    serve(state, ObjectKind::Index, id, method, headers).await
}

async fn serve(
    State(state): State<AppState>,
    kind: ObjectKind,
    Path(id): Path<String>,
    method: Method,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let id: flotilla_core::ids::ChunkId =
        id.parse().map_err(|_| ApiError::bad_request("object ids are 64 lowercase hex characters"))?;
    let key = object_key(kind, &id.to_hex());
    // A redirect is only for an object the coordinator has stored (one indexed read): an
    // unknown id is a 404 here, not a redirect to the bucket's or the CDN's own error.
    if (state.config.cdn_base_url.is_some() || state.config.presign_downloads)
        && !super::publish::is_stored(&state, kind, &id.to_hex()).await?
    {
        return Err(ApiError::not_found(format!("no {} {id} is stored", kind.as_str())));
    }
    if let Some(base) = &state.config.cdn_base_url {
        let location = format!("{}/{key}", base.trim_end_matches('/'));
        return Ok((StatusCode::FOUND, [(header::LOCATION, location)]).into_response());
    }
    // Presigned URLs are never logged: they are bearer credentials until they expire.
    if state.config.presign_downloads
        && let Some(location) = state.store.presigned_get(&key, state.config.presign_ttl).await?
    {
        return Ok((StatusCode::FOUND, [(header::LOCATION, location)]).into_response());
    }
    let etag = format!("\"{id}\"");
    if headers.get(header::IF_NONE_MATCH).and_then(|v| v.to_str().ok()).is_some_and(|v| v.contains(&etag)) {
        return Ok((StatusCode::NOT_MODIFIED, [(header::ETAG, etag)]).into_response());
    }
    let range = match headers.get(header::RANGE).and_then(|v| v.to_str().ok()) {
        Some(r) => Some(parse_range(r).ok_or_else(|| {
            ApiError::new(StatusCode::RANGE_NOT_SATISFIABLE, "bad_range", "only `bytes=start-end` ranges are supported")
        })?),
        None => None,
    };
    // HEAD asks the store for the size only (an empty range), not for the bytes.
    let wanted =
        if method == Method::HEAD { Some((0, 0)) } else { range.map(|(s, e)| (s, e.map_or(u64::MAX, |e| e + 1))) };
    let Some(obj) = state.store.get(&key, wanted).await? else {
        return Err(ApiError::not_found(format!("no {} {id} is stored", kind.as_str())));
    };
    // Length of what a GET sends: the range clamped to the object, or all of it.
    let len = match range {
        Some((start, end)) => end.map_or(obj.total, |e| e.saturating_add(1).min(obj.total)).saturating_sub(start),
        None => obj.total,
    };
    let common = [
        (header::ETAG, etag),
        (header::CACHE_CONTROL, "public, max-age=31536000, immutable".to_owned()),
        (header::ACCEPT_RANGES, "bytes".to_owned()),
        (header::CONTENT_TYPE, "application/octet-stream".to_owned()),
        // Set explicitly so that HEAD, whose body is empty, reports the size.
        (header::CONTENT_LENGTH, len.to_string()),
    ];
    let body = if method == Method::HEAD {
        Body::empty()
    } else {
        state.metrics.bytes_served.fetch_add(obj.bytes.len() as u64, Ordering::Relaxed);
        Body::from(obj.bytes)
    };
    Ok(match range {
        Some((start, _)) => {
            if start >= obj.total {
                return Err(ApiError::new(StatusCode::RANGE_NOT_SATISFIABLE, "bad_range", "range starts past the end"));
            }
            let end = start + len - 1;
            let content_range = format!("bytes {start}-{end}/{}", obj.total);
            (StatusCode::PARTIAL_CONTENT, common, [(header::CONTENT_RANGE, content_range)], body).into_response()
        }
        None => (StatusCode::OK, common, body).into_response(),
    })
}

/// `bytes=a-b` or `bytes=a-` (inclusive end).
fn parse_range(v: &str) -> Option<(u64, Option<u64>)> {
    let spec = v.strip_prefix("bytes=")?;
    let (a, b) = spec.split_once('-')?;
    let start: u64 = a.trim().parse().ok()?;
    let end = if b.trim().is_empty() { None } else { Some(b.trim().parse().ok()?) };
    if end.is_some_and(|e| e < start) {
        return None;
    }
    Some((start, end))
}
