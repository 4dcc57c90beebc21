//! Bearer tokens: random 256-bit values shown once, stored as their SHA-256. Four scopes:
//! `device` (one device of one product), `publish` (one product), `cache` (reading one
//! product's releases: a site cache prefetching them), `admin` (everything).

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use sha2::Digest as _;

use crate::db::now;
use crate::error::ApiError;
use crate::state::AppState;

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// One device.
    Device,
    /// Publishing for one product (and steering its rollouts).
    Publish,
    /// Reading one product's releases and their signed manifests, nothing else: what a
    /// `flotilla-mesh` site cache needs to prefetch them.
    Cache,
    /// Everything.
    Admin,
}

impl Scope {
    /// Database name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Device => "device",
            Self::Publish => "publish",
            Self::Cache => "cache",
            Self::Admin => "admin",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "device" => Some(Self::Device),
            "publish" => Some(Self::Publish),
            "cache" => Some(Self::Cache),
            "admin" => Some(Self::Admin),
            _ => None,
        }
    }
}

/// The authenticated caller.
#[derive(Debug, Clone)]
pub struct Principal {
    /// Scope.
    pub scope: Scope,
    /// Product for device and publish tokens.
    pub product: Option<String>,
    /// Device id for device tokens.
    pub device_id: Option<String>,
    /// Who, for the audit log.
    pub label: String,
}

impl Principal {
    /// Requires admin.
    ///
    /// # Errors
    /// 403 for other scopes.
    pub fn require_admin(&self) -> Result<(), ApiError> {
        if self.scope == Scope::Admin { Ok(()) } else { Err(ApiError::forbidden("this needs an admin token")) }
    }

    /// Requires a publish token for `product`, or admin.
    ///
    /// # Errors
    /// 403 otherwise.
    pub fn require_publisher_of(&self, product: &str) -> Result<(), ApiError> {
        match self.scope {
            Scope::Admin => Ok(()),
            Scope::Publish if self.product.as_deref() == Some(product) => Ok(()),
            Scope::Publish => {
                Err(ApiError::forbidden(format!("this token may not publish or steer product {product:?}")))
            }
            Scope::Device => Err(ApiError::forbidden("device tokens cannot publish or steer rollouts")),
            Scope::Cache => Err(ApiError::forbidden("cache tokens are read-only")),
        }
    }

    /// Requires a publish or cache token for `product`, or admin: reading its releases.
    ///
    /// # Errors
    /// 403 otherwise.
    pub fn require_reader_of(&self, product: &str) -> Result<(), ApiError> {
        match self.scope {
            Scope::Cache if self.product.as_deref() == Some(product) => Ok(()),
            Scope::Cache => Err(ApiError::forbidden(format!("this token may not read product {product:?}"))),
            _ => self.require_publisher_of(product),
        }
    }

    /// Requires any publish token, or admin (content uploads are product-neutral).
    ///
    /// # Errors
    /// 403 otherwise.
    pub fn require_any_publisher(&self) -> Result<(), ApiError> {
        match self.scope {
            Scope::Admin | Scope::Publish => Ok(()),
            Scope::Device => Err(ApiError::forbidden("device tokens cannot upload content")),
            Scope::Cache => Err(ApiError::forbidden("cache tokens are read-only")),
        }
    }

    /// Requires a device token; returns (product, device id).
    ///
    /// # Errors
    /// 403 otherwise.
    pub fn require_device(&self) -> Result<(&str, &str), ApiError> {
        match (self.scope, &self.product, &self.device_id) {
            (Scope::Device, Some(p), Some(d)) => Ok((p, d)),
            _ => Err(ApiError::forbidden("this needs a device token (POST /v1/devices/enroll)")),
        }
    }
}

/// A fresh token: `flt_` + 43 characters of base64url (256 random bits).
///
/// # Errors
/// The OS random source failed.
pub fn new_token() -> Result<String, ApiError> {
    let mut b = [0u8; 32];
    getrandom::fill(&mut b).map_err(ApiError::internal)?;
    Ok(format!("flt_{}", URL_SAFE_NO_PAD.encode(b)))
}

/// What is stored for a token.
pub fn token_hash(token: &str) -> String {
    hex::encode(sha2::Sha256::digest(token.as_bytes()))
}

/// Stores a token.
///
/// # Errors
/// Database errors.
pub async fn insert_token(
    state: &AppState,
    token: &str,
    scope: Scope,
    product: Option<&str>,
    device_id: Option<&str>,
    label: &str,
) -> Result<(), ApiError> {
    sqlx::query(
        "INSERT INTO tokens (hash, scope, product, device_id, label, created_at, revoked) VALUES ($1, $2, $3, $4, $5, $6, 0)",
    )
    .bind(token_hash(token))
    .bind(scope.as_str())
    .bind(product)
    .bind(device_id)
    .bind(label)
    .bind(now())
    .execute(&state.db.pool)
    .await?;
    Ok(())
}

impl FromRequestParts<AppState> for Principal {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let header = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .ok_or_else(|| ApiError::unauthorized("missing Authorization: Bearer <token>"))?;
        let token = header
            .to_str()
            .ok()
            .and_then(|h| h.strip_prefix("Bearer "))
            .filter(|t| t.len() <= 128)
            .ok_or_else(|| ApiError::unauthorized("Authorization must be `Bearer <token>`"))?;
        let hash = token_hash(token.trim());
        let row: Option<(String, Option<String>, Option<String>, String, Option<i64>, i64)> =
            sqlx::query_as("SELECT scope, product, device_id, label, expires_at, revoked FROM tokens WHERE hash = $1")
                .bind(&hash)
                .fetch_optional(&state.db.pool)
                .await?;
        let Some((scope, product, device_id, label, expires_at, revoked)) = row else {
            return Err(ApiError::unauthorized("unknown token; log in again or re-enroll the device"));
        };
        if revoked != 0 {
            return Err(ApiError::unauthorized("token was revoked"));
        }
        if expires_at.is_some_and(|e| e <= now()) {
            return Err(ApiError::unauthorized("token expired; refresh it (POST /v1/auth/refresh) or log in again"));
        }
        let scope = Scope::parse(&scope).ok_or_else(|| ApiError::internal("token with unknown scope"))?;
        Ok(Self { scope, product, device_id, label })
    }
}
