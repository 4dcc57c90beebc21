//! The coordinator's device API over HTTP: enroll, update check, events, content.

use std::time::Duration;

use reqwest::StatusCode;
use serde::{Deserialize, Serialize};

use crate::events::Event;

/// Connection timeout: a coordinator that does not answer in this time is "offline".
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Whole-request timeout for API calls and one chunk (chunks are at most a few hundred KiB).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);

/// Client errors.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// Network failure (unreachable, reset, timeout).
    #[error("coordinator unreachable ({url}): {source}")]
    Network {
        /// The URL (without query).
        url: String,
        /// The cause.
        source: reqwest::Error,
    },
    /// The configured CA certificate file cannot be used.
    #[error("ca_cert {path}: {reason}")]
    Tls {
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// The coordinator answered with an error.
    #[error("{url}: HTTP {status}: {body}")]
    Status {
        /// The URL.
        url: String,
        /// The status.
        status: StatusCode,
        /// The error body (truncated).
        body: String,
    },
    /// A body longer than the declared bound.
    #[error("{url}: response is longer than the {limit} bytes allowed")]
    TooLarge {
        /// The URL.
        url: String,
        /// The bound.
        limit: u64,
    },
    /// A body that is not the expected JSON.
    #[error("{url}: unexpected response: {message}")]
    Body {
        /// The URL.
        url: String,
        /// What was wrong.
        message: String,
    },
}

impl ClientError {
    /// Whether retrying later can help (network trouble, server errors, rate limits).
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Network { .. } => true,
            Self::Status { status, .. } => status.is_server_error() || *status == StatusCode::TOO_MANY_REQUESTS,
            _ => false,
        }
    }
}

/// Enrollment request.
#[derive(Debug, Serialize)]
pub struct EnrollRequest<'a> {
    /// Device id.
    pub device_id: &'a str,
    /// Product.
    pub product: &'a str,
    /// Channel.
    pub channel: &'a str,
    /// Hardware model.
    pub hardware: Option<&'a str>,
    /// Platform (`linux`, `android`, …).
    pub platform: &'a str,
    /// CPU architecture.
    pub architecture: &'a str,
    /// Installed version.
    pub version: Option<&'a str>,
    /// Installed version_code.
    pub version_code: Option<u64>,
    /// Agent version.
    pub agent_version: &'a str,
    /// Native shell version.
    pub native_version: Option<&'a str>,
    /// The fleet secret.
    pub enrollment_secret: Option<&'a str>,
}

/// An offered release.
#[derive(Debug, Clone, Deserialize)]
pub struct Offer {
    /// Coordinator release id.
    pub release_id: i64,
    /// version_code (unverified; the manifest's is what counts).
    pub version_code: u64,
    /// Publisher-signed manifest envelope, verbatim.
    pub manifest: String,
    /// Coordinator-signed assignment envelope.
    pub assignment: String,
    /// Where the index is.
    pub index: OfferIndex,
    /// `/v1/chunks/{id}`.
    pub chunk_url_template: String,
    /// Install without asking.
    #[serde(default)]
    pub mandatory: bool,
}

/// Index location.
#[derive(Debug, Clone, Deserialize)]
pub struct OfferIndex {
    /// URL (absolute or relative to the coordinator).
    pub url: String,
}

/// What an update check found.
#[derive(Debug, Clone)]
pub enum CheckOutcome {
    /// Nothing for this device.
    NoUpdate,
    /// The same offer as the ETag names.
    NotModified,
    /// A newer release needs a newer native shell.
    NativeTooOld {
        /// Required version.
        required: String,
    },
    /// A release, with its ETag.
    Offer(Box<Offer>, Option<String>),
}

/// A coordinator.
#[derive(Debug, Clone)]
pub struct Coordinator {
    http: reqwest::Client,
    base: String,
}

/// Largest trust-root chain answer read (64 roots of up to 512 KiB are far more than any
/// real chain; a hostile server cannot make the agent buffer more).
const MAX_CHAIN_BYTES: u64 = 8 << 20;

fn truncate(s: String) -> String {
    if s.len() > 512 { format!("{}…", &s[..s.char_indices().nth(500).map_or(s.len(), |(i, _)| i)]) } else { s }
}

/// Installs ring as the process's rustls crypto provider (reqwest's rustls is built without
/// one: the default provider pulls aws-lc). Later calls do nothing.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

impl Coordinator {
    /// A client for `base` (e.g. `http://coordinator:8080`).
    ///
    /// # Errors
    /// The HTTP client cannot be built.
    pub fn new(base: &str) -> Result<Self, ClientError> {
        Self::with_ca(base, None)
    }

    /// A client for `base` that also trusts the PEM certificates in `ca_cert` (a fleet's
    /// private CA) besides the system's roots.
    ///
    /// # Errors
    /// The CA file cannot be read or holds no certificate, or the client cannot be built.
    pub fn with_ca(base: &str, ca_cert: Option<&std::path::Path>) -> Result<Self, ClientError> {
        install_crypto_provider();
        let mut builder = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(REQUEST_TIMEOUT)
            .user_agent(concat!("flotilla-agent/", env!("CARGO_PKG_VERSION")));
        if let Some(path) = ca_cert {
            let bad = |reason: String| ClientError::Tls { path: path.display().to_string(), reason };
            let pem = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| bad(e.to_string()))?;
            if certs.is_empty() {
                return Err(bad("no PEM certificate in the file".into()));
            }
            for cert in certs {
                builder = builder.add_root_certificate(cert);
            }
        }
        let http = builder.build().map_err(|source| ClientError::Network { url: base.to_owned(), source })?;
        Ok(Self { http, base: base.trim_end_matches('/').to_owned() })
    }

    /// An absolute URL for a path or URL the coordinator returned.
    pub fn url(&self, path_or_url: &str) -> String {
        if path_or_url.starts_with("http://") || path_or_url.starts_with("https://") {
            path_or_url.to_owned()
        } else {
            format!("{}{path_or_url}", self.base)
        }
    }

    async fn error_of(url: &str, resp: reqwest::Response) -> ClientError {
        let status = resp.status();
        let body = resp.text().await.unwrap_or_default();
        let message = serde_json::from_str::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v["error"]["message"].as_str().or(v["message"].as_str()).map(str::to_owned))
            .unwrap_or(body);
        ClientError::Status { url: url.to_owned(), status, body: truncate(message) }
    }

    /// Enrolls; returns the device token.
    ///
    /// # Errors
    /// [`ClientError`].
    pub async fn enroll(&self, req: &EnrollRequest<'_>) -> Result<String, ClientError> {
        let url = self.url("/v1/devices/enroll");
        let resp = self
            .http
            .post(&url)
            .json(req)
            .send()
            .await
            .map_err(|source| ClientError::Network { url: url.clone(), source })?;
        if !resp.status().is_success() {
            return Err(Self::error_of(&url, resp).await);
        }
        let v: serde_json::Value =
            resp.json().await.map_err(|e| ClientError::Body { url: url.clone(), message: e.to_string() })?;
        v["token"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| ClientError::Body { url, message: "no token in the enrollment answer".into() })
    }

    /// `GET /v1/updates/check`.
    ///
    /// # Errors
    /// [`ClientError`].
    pub async fn check(
        &self,
        token: &str,
        query: &[(&str, String)],
        if_none_match: Option<&str>,
    ) -> Result<CheckOutcome, ClientError> {
        let url = self.url("/v1/updates/check");
        let mut req = self.http.get(&url).bearer_auth(token).query(query);
        if let Some(tag) = if_none_match {
            req = req.header(reqwest::header::IF_NONE_MATCH, tag);
        }
        let resp = req.send().await.map_err(|source| ClientError::Network { url: url.clone(), source })?;
        match resp.status() {
            StatusCode::NO_CONTENT => return Ok(CheckOutcome::NoUpdate),
            StatusCode::NOT_MODIFIED => return Ok(CheckOutcome::NotModified),
            s if !s.is_success() => return Err(Self::error_of(&url, resp).await),
            _ => {}
        }
        let etag = resp.headers().get(reqwest::header::ETAG).and_then(|v| v.to_str().ok()).map(str::to_owned);
        let bytes = read_bounded(&url, resp, 4 << 20).await?;
        let v: serde_json::Value = serde_json::from_slice(&bytes)
            .map_err(|e| ClientError::Body { url: url.clone(), message: e.to_string() })?;
        if v["status"] == "native_too_old" {
            return Ok(CheckOutcome::NativeTooOld {
                required: v["required_native_version"].as_str().unwrap_or("?").to_owned(),
            });
        }
        let offer: Offer = serde_json::from_value(v).map_err(|e| ClientError::Body { url, message: e.to_string() })?;
        Ok(CheckOutcome::Offer(Box::new(offer), etag))
    }

    /// Downloads at most `limit` bytes from a path or URL (redirects are followed).
    ///
    /// # Errors
    /// [`ClientError`], [`ClientError::TooLarge`] past the bound.
    pub async fn get_bounded(&self, path_or_url: &str, limit: u64) -> Result<Vec<u8>, ClientError> {
        let url = self.url(path_or_url);
        let resp =
            self.http.get(&url).send().await.map_err(|source| ClientError::Network { url: url.clone(), source })?;
        if !resp.status().is_success() {
            return Err(Self::error_of(&url, resp).await);
        }
        read_bounded(&url, resp, limit).await
    }

    /// `GET /v1/products/{product}/trust-roots?after=N`: the roots after version N as
    /// (version, envelope), unverified (the caller walks the chain).
    ///
    /// # Errors
    /// [`ClientError`].
    pub async fn trust_roots(
        &self,
        token: &str,
        product: &str,
        after: u64,
    ) -> Result<Vec<(u64, Vec<u8>)>, ClientError> {
        let url = self.url(&format!("/v1/products/{product}/trust-roots"));
        let resp = self
            .http
            .get(&url)
            .bearer_auth(token)
            .query(&[("after", after)])
            .send()
            .await
            .map_err(|source| ClientError::Network { url: url.clone(), source })?;
        if !resp.status().is_success() {
            return Err(Self::error_of(&url, resp).await);
        }
        let bytes = read_bounded(&url, resp, MAX_CHAIN_BYTES).await?;
        let v: serde_json::Value = serde_json::from_slice(&bytes)
            .map_err(|e| ClientError::Body { url: url.clone(), message: e.to_string() })?;
        let Some(list) = v["trust_roots"].as_array() else {
            return Err(ClientError::Body { url, message: "no trust_roots list".into() });
        };
        list.iter()
            .map(|r| match (r["version"].as_u64(), r["trust_root"].as_str()) {
                (Some(version), Some(text)) => Ok((version, text.as_bytes().to_vec())),
                _ => Err(ClientError::Body {
                    url: url.clone(),
                    message: "a trust root entry without version or envelope".into(),
                }),
            })
            .collect()
    }

    /// Sends a batch of events.
    ///
    /// # Errors
    /// [`ClientError`].
    pub async fn send_events(&self, token: &str, events: &[Event]) -> Result<(), ClientError> {
        let url = self.url("/v1/devices/events");
        let resp = self
            .http
            .post(&url)
            .bearer_auth(token)
            .json(&serde_json::json!({ "events": events }))
            .send()
            .await
            .map_err(|source| ClientError::Network { url: url.clone(), source })?;
        if !resp.status().is_success() {
            return Err(Self::error_of(&url, resp).await);
        }
        Ok(())
    }
}

async fn read_bounded(url: &str, mut resp: reqwest::Response, limit: u64) -> Result<Vec<u8>, ClientError> {
    if resp.content_length().is_some_and(|n| n > limit) {
        return Err(ClientError::TooLarge { url: url.to_owned(), limit });
    }
    let mut out = Vec::with_capacity(resp.content_length().unwrap_or(0).min(limit) as usize);
    while let Some(chunk) = resp.chunk().await.map_err(|source| ClientError::Network { url: url.to_owned(), source })? {
        if out.len() as u64 + chunk.len() as u64 > limit {
            return Err(ClientError::TooLarge { url: url.to_owned(), limit });
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}
