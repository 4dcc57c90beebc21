//! Start-up: open the database and store, load or create keys, bootstrap the first admin
//! token, start background tasks, serve until cancelled.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::serve::ListenerExt as _;
use flotilla_core::keys::{Algorithm, SigningKey};
use tokio_util::sync::CancellationToken;

use crate::auth::{Scope, insert_token, new_token};
use crate::config::{Config, StorageConfig};
use crate::db::Db;
use crate::state::{AppState, Metrics, RateLimiter, ReleaseCache};
use crate::storage::{FsStore, S3Store, Storage};

/// Start-up failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// Database.
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    /// File system.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
    /// The rollout key.
    #[error("rollout key: {0}")]
    Key(String),
    /// Configuration.
    #[error("{0}")]
    Config(String),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> StartError {
    let what = what.into();
    move |source| StartError::Io { what, source }
}

/// Writes a file readable only by its owner.
fn write_private(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?;
    f.write_all(contents)?;
    f.sync_all()
}

fn load_rollout_key(config: &Config) -> Result<SigningKey, StartError> {
    let path = config.rollout_key_file.clone().unwrap_or_else(|| config.data_dir.join("rollout-key.pem"));
    if !path.exists() && config.rollout_key_file.is_none() {
        let key = SigningKey::generate(Algorithm::Ed25519).map_err(|e| StartError::Key(e.to_string()))?;
        let pem = key.to_pkcs8_pem().map_err(|e| StartError::Key(e.to_string()))?;
        write_private(&path, pem.as_bytes()).map_err(io(format!("writing {}", path.display())))?;
        tracing::info!(path = %path.display(), key_id = %key.public_key().key_id(), "generated the coordinator's rollout key; list its public key in each product's trust root under role `rollout`");
    }
    let pem = std::fs::read_to_string(&path).map_err(io(format!("reading rollout key {}", path.display())))?;
    SigningKey::from_pkcs8_pem(&pem).map_err(|e| StartError::Key(format!("{}: {e}", path.display())))
}

/// Builds the state: storage, database (migrated), keys, caches, and the first admin token.
///
/// # Errors
/// [`StartError`].
pub async fn build_state(config: Config) -> Result<AppState, StartError> {
    config.validate().map_err(|e| StartError::Config(e.to_string()))?;
    std::fs::create_dir_all(&config.data_dir)
        .map_err(io(format!("creating data dir {}", config.data_dir.display())))?;
    let store = match &config.storage {
        StorageConfig::Fs => {
            Storage::Fs(FsStore::new(config.data_dir.join("objects")).map_err(io("creating object dir"))?)
        }
        StorageConfig::S3(s3) => {
            let store = S3Store::new(s3).map_err(|e| StartError::Config(e.to_string()))?;
            store.check().await.map_err(|e| StartError::Config(e.to_string()))?;
            Storage::S3(store)
        }
    };
    let db = Db::connect(&config.database_url(), config.max_connections).await?;
    let rollout_key = load_rollout_key(&config)?;
    let mut id = [0u8; 8];
    let _ = getrandom::fill(&mut id);
    let state = AppState {
        db,
        store,
        config: Arc::new(config),
        rollout_key: Arc::new(rollout_key),
        cache: Arc::new(ReleaseCache::default()),
        metrics: Arc::new(Metrics::default()),
        last_seen: Default::default(),
        limiter: Arc::new(RateLimiter::default()),
        instance: format!("{}-{}", std::process::id(), hex::encode(id)),
    };
    bootstrap_admin(&state).await?;
    state.cache.reload(&state.db).await?;
    Ok(state)
}

/// On first start (no admin token yet) creates one: the configured `FLOTILLA_ADMIN_TOKEN`, or
/// a random one written to `<data_dir>/admin-token` (0600).
async fn bootstrap_admin(state: &AppState) -> Result<(), StartError> {
    let admins: i64 =
        sqlx::query_scalar("SELECT COUNT(*) FROM tokens WHERE scope = 'admin'").fetch_one(&state.db.pool).await?;
    if admins > 0 {
        return Ok(());
    }
    let token = match &state.config.admin_token {
        Some(t) => t.expose().to_owned(),
        None => {
            let t = new_token().map_err(|e| StartError::Key(e.message))?;
            let path = state.config.data_dir.join("admin-token");
            let _ = std::fs::remove_file(&path);
            write_private(&path, t.as_bytes()).map_err(io(format!("writing {}", path.display())))?;
            tracing::info!(path = %path.display(), "created the first admin token");
            t
        }
    };
    insert_token(state, &token, Scope::Admin, None, None, "admin").await.map_err(|e| StartError::Config(e.message))?;
    Ok(())
}

/// On PostgreSQL: reloads the release cache whenever another replica (or anyone) changes the
/// releases or products tables, through `LISTEN flotilla_cache`. A burst of notifications
/// costs one reload; after a lost connection the cache is reloaded, since notifications sent
/// meanwhile are gone.
async fn listen_for_changes(state: AppState, cancel: CancellationToken) {
    let url = state.config.database_url();
    let reload = |why: &'static str| {
        let state = state.clone();
        async move {
            if let Err(e) = state.cache.reload(&state.db).await {
                tracing::warn!(error = %e, why, "release cache reload failed");
            }
        }
    };
    while !cancel.is_cancelled() {
        let listener = async {
            let mut l = sqlx::postgres::PgListener::connect(&url).await?;
            l.listen(crate::db::CACHE_CHANNEL).await?;
            Ok::<_, sqlx::Error>(l)
        };
        let mut listener = match listener.await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "cannot LISTEN for cache changes; retrying in 5 s (periodic reload goes on)");
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(5)) => continue,
                }
            }
        };
        tracing::debug!("listening for release changes");
        // Changes made before LISTEN took effect.
        reload("listen started").await;
        loop {
            let next = tokio::select! {
                _ = cancel.cancelled() => return,
                n = listener.try_recv() => n,
            };
            match next {
                Ok(Some(_)) => {
                    while listener.next_buffered().is_some() {}
                    reload("change notified").await;
                }
                Ok(None) => reload("listener reconnected").await,
                Err(e) => {
                    tracing::warn!(error = %e, "cache change listener failed; reconnecting");
                    break;
                }
            }
        }
    }
}

/// Serves on `listener` until `cancel` fires, with the background tasks (last-seen flush,
/// cache refresh, rollout evaluator).
///
/// # Errors
/// I/O errors of the listener.
pub async fn serve(
    state: AppState,
    listener: tokio::net::TcpListener,
    cancel: CancellationToken,
) -> std::io::Result<()> {
    let tasks = tokio_util::task::TaskTracker::new();
    {
        let (state, cancel) = (state.clone(), cancel.clone());
        tasks.spawn(async move {
            let mut flush = tokio::time::interval(state.config.last_seen_flush);
            let mut refresh = tokio::time::interval(state.config.cache_refresh);
            let mut evaluate = tokio::time::interval(state.config.evaluator_interval);
            loop {
                tokio::select! {
                    biased;
                    _ = cancel.cancelled() => break,
                    _ = flush.tick() => {
                        if let Err(e) = crate::api::flush_last_seen(&state).await {
                            tracing::warn!(error = %e, "last-seen flush failed");
                        }
                    }
                    _ = refresh.tick() => {
                        if let Err(e) = state.cache.reload(&state.db).await {
                            tracing::warn!(error = %e, "release cache refresh failed");
                        }
                    }
                    _ = evaluate.tick() => {
                        match crate::rollout::evaluate(&state).await {
                            Ok(ev) if !ev.advanced.is_empty() || !ev.paused.is_empty() => {
                                tracing::info!(advanced = ?ev.advanced, paused = ?ev.paused, "rollout evaluator acted");
                            }
                            Ok(_) => {}
                            Err(e) => tracing::warn!(error = e.message, "rollout evaluation failed"),
                        }
                    }
                }
            }
            let _ = crate::api::flush_last_seen(&state).await;
            match crate::rollout::release_evaluator_lease(&state).await {
                Ok(true) => tracing::info!("gave the rollout evaluator's lease back"),
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, "could not give the evaluator's lease back; it expires by itself"),
            }
        });
    }
    if state.db.engine == crate::db::Engine::Postgres {
        let (state, cancel) = (state.clone(), cancel.clone());
        tasks.spawn(listen_for_changes(state, cancel));
    }
    tasks.close();
    let app = crate::api::router(state.clone()).into_make_service_with_connect_info::<SocketAddr>();
    let result = match (&state.config.tls_cert, &state.config.tls_key) {
        (Some(cert), Some(key)) => {
            let config = crate::tls::server_config(cert, key).map_err(std::io::Error::other)?;
            // tap_io: ConnectInfo<SocketAddr> works for any listener whose Addr is a SocketAddr.
            let tls = crate::tls::TlsListener::new(listener, Arc::new(config))?.tap_io(|_| {});
            axum::serve(tls, app).with_graceful_shutdown(cancel.clone().cancelled_owned()).await
        }
        _ => axum::serve(listener, app).with_graceful_shutdown(cancel.clone().cancelled_owned()).await,
    };
    cancel.cancel();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(10), tasks.wait()).await;
    result
}
