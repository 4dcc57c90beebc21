//! Where the CLI finds its coordinator and token: flags, then `FLOTILLA_URL` /
//! `FLOTILLA_TOKEN`, then `~/.config/flotilla/config.toml` (written by `flotilla login`, 0600).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::error::{CliError, CliResult, io_err};

/// The stored login.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Login {
    /// Coordinator base URL.
    pub url: Option<String>,
    /// Bearer token (an API key or session token).
    pub token: Option<String>,
}

/// The config directory: `$FLOTILLA_CONFIG_DIR`, else `$XDG_CONFIG_HOME/flotilla`, else
/// `~/.config/flotilla`.
pub fn config_dir() -> CliResult<PathBuf> {
    if let Some(d) = std::env::var_os("FLOTILLA_CONFIG_DIR") {
        return Ok(PathBuf::from(d));
    }
    if let Some(x) = std::env::var_os("XDG_CONFIG_HOME") {
        return Ok(PathBuf::from(x).join("flotilla"));
    }
    let home = std::env::var_os("HOME").ok_or_else(|| CliError::usage("HOME is not set; set FLOTILLA_CONFIG_DIR"))?;
    Ok(PathBuf::from(home).join(".config/flotilla"))
}

/// Reads the stored login (empty when there is none).
pub fn load() -> CliResult<Login> {
    let path = config_dir()?.join("config.toml");
    match std::fs::read_to_string(&path) {
        Ok(text) => toml::from_str(&text).map_err(|e| CliError::usage(format!("{}: {e}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Login::default()),
        Err(e) => Err(io_err(&path)(e)),
    }
}

/// Stores the login with mode 0600.
pub fn save(login: &Login) -> CliResult<PathBuf> {
    let dir = config_dir()?;
    std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
    let path = dir.join("config.toml");
    let text = toml::to_string(login).map_err(|e| CliError::failure(e.to_string()))?;
    write_private(&path, text.as_bytes())?;
    Ok(path)
}

/// Writes a file readable only by its owner (atomically: temp file, rename).
pub fn write_private(path: &std::path::Path, bytes: &[u8]) -> CliResult<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f =
        std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp).map_err(io_err(&tmp))?;
    f.write_all(bytes).map_err(io_err(&tmp))?;
    f.sync_all().map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io_err(path))
}

/// Resolves URL and token: flag, environment, stored login.
pub fn resolve(url_flag: Option<String>, token_flag: Option<String>) -> CliResult<(String, Option<String>)> {
    let stored = load()?;
    let url = url_flag.or_else(|| std::env::var("FLOTILLA_URL").ok()).or(stored.url).ok_or_else(|| {
        CliError::usage("no coordinator URL: run `flotilla login --url URL --token TOKEN` or set FLOTILLA_URL")
    })?;
    let token = token_flag.or_else(|| std::env::var("FLOTILLA_TOKEN").ok()).or(stored.token);
    Ok((url.trim_end_matches('/').to_owned(), token))
}
