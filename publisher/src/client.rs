//! The coordinator's HTTP API, with errors mapped to exit codes and next steps.

use reqwest::{Method, StatusCode};
use serde_json::Value;

use crate::error::{CliError, CliResult, Kind};

/// An API client.
#[derive(Debug, Clone)]
pub struct Client {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
}

impl Client {
    /// A client for `base` with `token`. HTTPS trusts the system's roots plus the PEM
    /// certificates in `FLOTILLA_CA_CERT` (a private CA) when that is set.
    ///
    /// # Errors
    /// `FLOTILLA_CA_CERT` names a file that cannot be read or holds no certificate.
    pub fn new(base: String, token: Option<String>) -> CliResult<Self> {
        // reqwest's rustls is built without a provider (the default one pulls aws-lc).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut builder = reqwest::Client::builder().timeout(std::time::Duration::from_secs(120));
        if let Some(path) = std::env::var_os("FLOTILLA_CA_CERT").filter(|p| !p.is_empty()) {
            let path = std::path::PathBuf::from(path);
            let pem = std::fs::read(&path)
                .map_err(|e| CliError::usage(format!("FLOTILLA_CA_CERT {}: {e}", path.display())))?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem)
                .ok()
                .filter(|c| !c.is_empty())
                .ok_or_else(|| CliError::usage(format!("FLOTILLA_CA_CERT {}: no PEM certificate", path.display())))?;
            for cert in certs {
                builder = builder.add_root_certificate(cert);
            }
        }
        let http = builder.build().map_err(|e| CliError::failure(format!("cannot build the HTTP client: {e}")))?;
        Ok(Self { base, token, http })
    }

    /// The base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    fn request(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        let r = self.http.request(method, format!("{}{path}", self.base));
        match &self.token {
            Some(t) => r.bearer_auth(t),
            None => r,
        }
    }

    /// Sends and maps errors.
    pub async fn send(&self, req: reqwest::RequestBuilder) -> CliResult<reqwest::Response> {
        let resp = req.send().await.map_err(|e| {
            CliError::new(
                Kind::Network,
                format!(
                    "cannot reach the coordinator at {}: {e}; check the URL (flotilla login) and the network",
                    self.base
                ),
            )
        })?;
        if resp.status().is_success() || resp.status() == StatusCode::NOT_MODIFIED {
            return Ok(resp);
        }
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        let message = serde_json::from_str::<Value>(&text)
            .ok()
            .and_then(|v| v["error"]["message"].as_str().map(str::to_owned))
            .unwrap_or(text);
        Err(match status {
            StatusCode::UNAUTHORIZED => {
                CliError::new(Kind::Auth, format!("not authorised: {message}; run `flotilla login` with a valid token"))
            }
            StatusCode::FORBIDDEN => CliError::new(Kind::Auth, format!("forbidden: {message}")),
            StatusCode::CONFLICT => CliError::new(Kind::Conflict, format!("conflict: {message}")),
            StatusCode::NOT_FOUND => CliError::new(Kind::Usage, format!("not found: {message}")),
            StatusCode::UNPROCESSABLE_ENTITY => {
                CliError::new(Kind::Rejected, format!("refused by the coordinator: {message}"))
            }
            StatusCode::BAD_REQUEST => CliError::new(Kind::Usage, format!("bad request: {message}")),
            s => CliError::new(Kind::Failure, format!("coordinator answered {s}: {message}")),
        })
    }

    /// JSON request.
    pub async fn json(&self, method: Method, path: &str, body: Option<&Value>) -> CliResult<Value> {
        let mut r = self.request(method, path);
        if let Some(b) = body {
            r = r.json(b);
        }
        let resp = self.send(r).await?;
        if resp.status() == StatusCode::NO_CONTENT {
            return Ok(Value::Null);
        }
        resp.json()
            .await
            .map_err(|e| CliError::new(Kind::Failure, format!("unreadable answer from the coordinator: {e}")))
    }

    /// GET JSON.
    pub async fn get(&self, path: &str) -> CliResult<Value> {
        self.json(Method::GET, path, None).await
    }

    /// POST JSON.
    pub async fn post(&self, path: &str, body: &Value) -> CliResult<Value> {
        self.json(Method::POST, path, Some(body)).await
    }

    /// PUT bytes.
    pub async fn put_bytes(&self, path: &str, bytes: Vec<u8>) -> CliResult<()> {
        self.send(self.request(Method::PUT, path).body(bytes)).await.map(|_| ())
    }

    /// GET bytes.
    pub async fn get_bytes(&self, path: &str) -> CliResult<Vec<u8>> {
        let resp = self.send(self.request(Method::GET, path)).await?;
        resp.bytes()
            .await
            .map(|b| b.to_vec())
            .map_err(|e| CliError::new(Kind::Network, format!("download of {path} broke off: {e}")))
    }
}
