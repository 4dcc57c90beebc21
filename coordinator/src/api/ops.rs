//! Health, readiness, metrics and the OpenAPI document.

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;

use crate::state::AppState;

/// The OpenAPI document, kept beside the code.
const OPENAPI: &str = include_str!("../../openapi.json");

pub(crate) async fn healthz() -> &'static str {
    "ok"
}

pub(crate) async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    match sqlx::query_scalar::<_, i64>("SELECT 1").fetch_one(&state.db.pool).await {
        Ok(_) => (StatusCode::OK, "ready"),
        Err(e) => {
            tracing::warn!(error = %e, "readiness: database unreachable");
            (StatusCode::SERVICE_UNAVAILABLE, "database unreachable")
        }
    }
}

pub(crate) async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], state.metrics.render())
}

pub(crate) async fn openapi() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI)
}

/// The coordinator's rollout public key: publishers list it in their trust root (role
/// `rollout`) so devices accept this coordinator's signed check responses.
pub(crate) async fn rollout_key(State(state): State<AppState>) -> axum::Json<serde_json::Value> {
    let public = state.rollout_key.public_key();
    axum::Json(serde_json::json!({
        "key_id": public.key_id().to_hex(),
        "algorithm": public.algorithm().to_string(),
        "public_key_pem": public.to_pem(),
    }))
}
