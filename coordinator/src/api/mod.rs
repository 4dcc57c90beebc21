//! The HTTP API, versioned under `/v1`. See the README's API table and `/v1/openapi.json`.

mod admin;
pub use devices::flush_last_seen;
mod content;
mod devices;
mod ops;
mod publish;
mod roots;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{delete, get, post, put};

use crate::state::AppState;

/// Largest JSON body (manifests, event batches, id lists): 4 MiB.
pub const MAX_JSON_BODY: usize = 4 << 20;
/// Largest object upload (chunk objects and indexes): 64 MiB.
pub const MAX_OBJECT_BODY: usize = 64 << 20;

/// All routes.
pub fn router(state: AppState) -> Router {
    let objects = Router::new()
        .route("/v1/chunks/{id}", put(publish::put_chunk).get(content::get_chunk).head(content::get_chunk))
        .route("/v1/indexes/{id}", put(publish::put_index).get(content::get_index).head(content::get_index))
        .layer(DefaultBodyLimit::max(MAX_OBJECT_BODY));
    Router::new()
        .route("/healthz", get(ops::healthz))
        .route("/readyz", get(ops::readyz))
        .route("/metrics", get(ops::metrics))
        .route("/v1/openapi.json", get(ops::openapi))
        .route("/v1/rollout-key", get(ops::rollout_key))
        .route("/v1/auth/token", post(admin::exchange_token))
        .route("/v1/auth/refresh", post(admin::refresh_token))
        .route("/v1/tokens", post(admin::create_token))
        .route("/v1/products", post(admin::create_product).get(admin::list_products))
        .route("/v1/products/{product}", get(admin::get_product))
        .route("/v1/products/{product}/stages", put(admin::set_stage_plan))
        .route("/v1/products/{product}/trust-root", put(roots::rotate))
        .route("/v1/products/{product}/trust-roots", get(roots::chain))
        .route("/v1/devices/enroll", post(devices::enroll))
        .route("/v1/updates/check", get(devices::check))
        .route("/v1/devices/events", post(devices::events))
        .route("/v1/devices", get(admin::list_devices))
        .route("/v1/chunks/missing", post(publish::missing_chunks))
        .route("/v1/releases", post(publish::publish_release).get(admin::list_releases))
        .route("/v1/releases/{id}", get(admin::get_release).delete(admin::archive_release))
        .route("/v1/releases/{id}/stats", get(admin::release_stats))
        .route("/v1/releases/{id}/pause", post(admin::pause))
        .route("/v1/releases/{id}/resume", post(admin::resume))
        .route("/v1/releases/{id}/advance", post(admin::advance))
        .route("/v1/releases/{id}/halt", post(admin::halt))
        .route("/v1/releases/{id}/percentage", post(admin::set_percentage))
        .route("/v1/releases/{id}/rollback", post(publish::rollback))
        .route("/v1/audit", get(admin::audit_log))
        .route("/v1/releases/{id}/archive", delete(admin::archive_release))
        .layer(DefaultBodyLimit::max(MAX_JSON_BODY))
        .merge(objects)
        .with_state(state)
}
