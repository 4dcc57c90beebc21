//! `flotilla-coordinator`: parses flags and environment, loads the config file, serves.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Parser;
use flotilla_coordinator::config::{Config, S3Config, Secret, StorageConfig};
use tokio_util::sync::CancellationToken;

/// Flotilla coordinator: enrollment, signed update checks, publishing, staged rollouts.
///
/// With no configuration it keeps SQLite and objects under ./flotilla-data and listens on
/// 127.0.0.1:8080. Layers, later wins: config file, environment, flags.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// TOML config file.
    #[arg(long, env = "FLOTILLA_CONFIG")]
    config: Option<PathBuf>,
    /// Listen address, e.g. 0.0.0.0:8080.
    #[arg(long, env = "FLOTILLA_LISTEN")]
    listen: Option<std::net::SocketAddr>,
    /// Port (the seeds' PORT); keeps the configured host.
    #[arg(long, env = "PORT")]
    port: Option<u16>,
    /// Data directory.
    #[arg(long, env = "FLOTILLA_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// postgres://… to use PostgreSQL; unset: SQLite in the data directory.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
    /// S3 bucket for objects (with S3_ENDPOINT for MinIO, R2, Garage).
    #[arg(long, env = "S3_BUCKET")]
    s3_bucket: Option<String>,
    /// S3 endpoint URL (path-style addressing when set).
    #[arg(long, env = "S3_ENDPOINT")]
    s3_endpoint: Option<String>,
    /// S3 region (default us-east-1).
    #[arg(long, env = "AWS_REGION")]
    s3_region: Option<String>,
    /// S3 access key id.
    #[arg(long, env = "AWS_ACCESS_KEY_ID", hide_env_values = true)]
    s3_access_key_id: Option<String>,
    /// S3 secret access key.
    #[arg(long, env = "AWS_SECRET_ACCESS_KEY", hide_env_values = true)]
    s3_secret_access_key: Option<String>,
    /// Session token of temporary S3 credentials.
    #[arg(long, env = "AWS_SESSION_TOKEN", hide_env_values = true)]
    s3_session_token: Option<String>,
    /// Redirect chunk and index downloads to presigned S3 URLs.
    #[arg(long, env = "FLOTILLA_PRESIGN_DOWNLOADS")]
    presign_downloads: bool,
    /// CDN base URL that chunk and index downloads redirect to.
    #[arg(long, env = "FLOTILLA_CDN_BASE_URL")]
    cdn_base_url: Option<String>,
    /// PKCS#8 PEM file of the coordinator's rollout signing key.
    #[arg(long, env = "FLOTILLA_ROLLOUT_KEY")]
    rollout_key: Option<PathBuf>,
    /// First admin token (only used when none exists yet).
    #[arg(long, env = "FLOTILLA_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
    /// Let devices enroll without an enrollment secret.
    #[arg(long, env = "FLOTILLA_OPEN_ENROLLMENT")]
    open_enrollment: bool,
    /// Rollout evaluator interval, e.g. 30m or 5s.
    #[arg(long, env = "FLOTILLA_EVALUATOR_INTERVAL", value_parser = humantime::parse_duration)]
    evaluator_interval: Option<std::time::Duration>,
    /// How long one replica holds the evaluator, e.g. 90s (default: three intervals, ≥ 30 s).
    #[arg(long, env = "FLOTILLA_EVALUATOR_LEASE", value_parser = humantime::parse_duration)]
    evaluator_lease: Option<std::time::Duration>,
    /// Rate-limit by the client address a trusted load balancer appends to X-Forwarded-For.
    #[arg(long, env = "FLOTILLA_TRUST_FORWARDED_FOR")]
    trust_forwarded_for: bool,
    /// PEM certificate chain: serve HTTPS (with --tls-key).
    #[arg(long, env = "FLOTILLA_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "FLOTILLA_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Log filter (tracing's EnvFilter syntax).
    #[arg(long, env = "RUST_LOG", default_value = "info")]
    log: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(&cli.log))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    // The seed backends' settings that have no job here: say so instead of silently ignoring.
    if std::env::var_os("JWT_SECRET").is_some() {
        tracing::info!(
            "JWT_SECRET is set but unused: Flotilla tokens are random and stored hashed, so there is no signing secret"
        );
    }
    if std::env::var_os("REDIS_URL").is_some() {
        tracing::info!(
            "REDIS_URL is set but unused: active releases are cached in process and refreshed from the database"
        );
    }
    let mut config = match &cli.config {
        Some(path) => Config::load(path).with_context(|| format!("loading {}", path.display()))?,
        None => Config::default(),
    };
    if let Some(l) = cli.listen {
        config.listen = l;
    }
    if let Some(p) = cli.port {
        config.listen.set_port(p);
    }
    if let Some(d) = cli.data_dir {
        config.data_dir = d;
    }
    if let Some(u) = cli.database_url {
        config.database_url = Some(Secret::new(u));
    }
    if let Some(bucket) = cli.s3_bucket {
        config.storage = StorageConfig::S3(S3Config { bucket, ..S3Config::default() });
    }
    // The environment fills in an S3 block from the file too (credentials belong there).
    if let StorageConfig::S3(s3) = &mut config.storage {
        s3.endpoint = cli.s3_endpoint.or(s3.endpoint.take());
        s3.region = cli.s3_region.or(s3.region.take());
        s3.access_key_id = cli.s3_access_key_id.or(s3.access_key_id.take());
        s3.secret_access_key = cli.s3_secret_access_key.map(Secret::new).or(s3.secret_access_key.take());
        s3.session_token = cli.s3_session_token.map(Secret::new).or(s3.session_token.take());
    }
    config.presign_downloads |= cli.presign_downloads;
    if cli.cdn_base_url.is_some() {
        config.cdn_base_url = cli.cdn_base_url;
    }
    if cli.rollout_key.is_some() {
        config.rollout_key_file = cli.rollout_key;
    }
    if let Some(t) = cli.admin_token {
        config.admin_token = Some(Secret::new(t));
    }
    config.open_enrollment |= cli.open_enrollment;
    config.trust_forwarded_for |= cli.trust_forwarded_for;
    if let Some(i) = cli.evaluator_interval {
        config.evaluator_interval = i;
    }
    if cli.evaluator_lease.is_some() {
        config.evaluator_lease = cli.evaluator_lease;
    }
    if cli.tls_cert.is_some() {
        (config.tls_cert, config.tls_key) = (cli.tls_cert, cli.tls_key);
    }
    config.validate().context("checking the configuration")?;
    if let (Some(cert), Some(key)) = (&config.tls_cert, &config.tls_key) {
        // Fails here, before anything starts, on a bad certificate or key.
        flotilla_coordinator::tls::server_config(cert, key)?;
    }
    let scheme = if config.tls_cert.is_some() { "https" } else { "http" };
    let listen = config.listen;
    let state = flotilla_coordinator::server::build_state(config).await.context("starting the coordinator")?;
    let listener = tokio::net::TcpListener::bind(listen).await.with_context(|| format!("binding {listen}"))?;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, "coordinator listening");
    // A line scripts and tests can wait for.
    println!("listening on {scheme}://{addr}");
    let cancel = CancellationToken::new();
    let on_signal = cancel.clone();
    tokio::spawn(async move {
        shutdown_signal().await;
        on_signal.cancel();
    });
    flotilla_coordinator::server::serve(state, listener, cancel).await.context("serving")?;
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => {
                let _ = ctrl_c.await;
                return;
            }
        };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
