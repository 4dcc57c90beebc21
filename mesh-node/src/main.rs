//! `flotilla-mesh`: the site cache. Thin over [`flotilla_mesh::cache`].

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use flotilla_mesh::Multiaddr;
use flotilla_mesh::cache::{self, ServeOptions};
use flotilla_mesh::store::DiskStore;

/// Flotilla site cache: serves release chunks to the devices of a site over the mesh.
#[derive(Debug, Parser)]
#[command(name = "flotilla-mesh", version, about)]
struct Cli {
    /// Log filter (tracing's EnvFilter syntax).
    #[arg(long, global = true, env = "RUST_LOG", default_value = "info")]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, clap::Args)]
struct StoreArgs {
    /// The chunk store directory.
    #[arg(long, env = "FLOTILLA_MESH_STORE")]
    store: PathBuf,
    /// The store's bound, in bytes.
    #[arg(long, env = "FLOTILLA_MESH_MAX_BYTES", default_value_t = 32 << 30)]
    max_bytes: u64,
    /// The fleet's trust root (DSSE JSON); releases not signed by it are refused.
    #[arg(long, env = "FLOTILLA_MESH_TRUST_ROOT")]
    trust_root: PathBuf,
}

#[derive(Debug, Subcommand)]
#[allow(clippy::large_enum_variant, reason = "parsed once at start; boxing buys nothing")]
enum Command {
    /// Serve the store to peers.
    Serve {
        #[command(flatten)]
        store: StoreArgs,
        /// Listen address (repeatable; default /ip4/0.0.0.0/tcp/4001 and, without a
        /// pre-shared key, /ip4/0.0.0.0/udp/4001/quic-v1).
        #[arg(long)]
        listen: Vec<Multiaddr>,
        /// A peer to keep connected to, ending in /p2p/ID (repeatable).
        #[arg(long)]
        bootstrap: Vec<Multiaddr>,
        /// Do not discover peers with mDNS.
        #[arg(long)]
        no_mdns: bool,
        /// Do not take part in Kademlia (provider records of the stored releases).
        #[arg(long)]
        no_kademlia: bool,
        /// Fleet-private network: a go-ipfs style swarm.key file (`/key/swarm/psk/1.0.0/`,
        /// `/base16/`, 64 hex digits); only peers with the same key connect. TCP only.
        #[arg(long, env = "FLOTILLA_MESH_PSK_FILE")]
        psk_file: Option<PathBuf>,
        /// Import this export (directory or .tar) before serving (repeatable).
        #[arg(long)]
        import: Vec<PathBuf>,
        /// How often to print the counters.
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        stats_every: Duration,
        /// Upload budget in bytes per second over all peers (default: unlimited).
        #[arg(long, env = "FLOTILLA_MESH_MAX_UPLOAD_RATE")]
        max_upload_rate: Option<u64>,
        /// How often releases imported with a rollout directive are offered to the site.
        #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
        announce_every: Duration,
        /// Serve Prometheus metrics on this address (`GET /metrics`).
        #[arg(long, env = "FLOTILLA_MESH_METRICS")]
        metrics: Option<std::net::SocketAddr>,
        /// Keep the live releases of a product from this coordinator (needs
        /// --prefetch-product and a token: --prefetch-token-file or FLOTILLA_MESH_PREFETCH_TOKEN,
        /// a `cache` token from `POST /v1/tokens`).
        #[arg(long, env = "FLOTILLA_MESH_PREFETCH_FROM", requires = "prefetch_product")]
        prefetch_from: Option<String>,
        /// The product to prefetch.
        #[arg(long, env = "FLOTILLA_MESH_PREFETCH_PRODUCT", requires = "prefetch_from")]
        prefetch_product: Option<String>,
        /// Only this channel (default: every channel of the product).
        #[arg(long, env = "FLOTILLA_MESH_PREFETCH_CHANNEL")]
        prefetch_channel: Option<String>,
        /// A file holding the coordinator token (read once at start).
        #[arg(long, env = "FLOTILLA_MESH_PREFETCH_TOKEN_FILE")]
        prefetch_token_file: Option<PathBuf>,
        /// How often to look for new releases.
        #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
        prefetch_every: Duration,
        /// Tests only: serve bad chunks.
        #[arg(long, hide = true, env = "FLOTILLA_MESH_TEST_CORRUPT")]
        test_corrupt: Option<cache::Corruption>,
    },
    /// Import a `flotilla export` directory or .tar into the store.
    Import {
        #[command(flatten)]
        store: StoreArgs,
        /// The export.
        export: PathBuf,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_new(&cli.log).unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    match cli.command {
        Command::Serve {
            store,
            listen,
            bootstrap,
            no_mdns,
            no_kademlia,
            psk_file,
            import,
            stats_every,
            announce_every,
            max_upload_rate,
            metrics,
            prefetch_from,
            prefetch_product,
            prefetch_channel,
            prefetch_token_file,
            prefetch_every,
            test_corrupt,
        } => {
            let prefetch = match (prefetch_from, prefetch_product) {
                (Some(url), Some(product)) => {
                    let token = match (prefetch_token_file, std::env::var("FLOTILLA_MESH_PREFETCH_TOKEN")) {
                        (Some(path), _) => std::fs::read_to_string(&path)
                            .with_context(|| format!("reading the prefetch token {}", path.display()))?
                            .trim()
                            .to_owned(),
                        (None, Ok(t)) => t,
                        (None, Err(_)) => anyhow::bail!(
                            "--prefetch-from needs a token: --prefetch-token-file or FLOTILLA_MESH_PREFETCH_TOKEN \
                             (an admin makes one with POST /v1/tokens {{\"scope\": \"cache\", \"product\": ...}})"
                        ),
                    };
                    Some(flotilla_mesh::prefetch::PrefetchOptions {
                        url,
                        token,
                        product,
                        channel: prefetch_channel,
                        every: prefetch_every,
                    })
                }
                _ => None,
            };
            let psk = psk_file.as_deref().map(flotilla_mesh::load_psk).transpose()?;
            let listen = if listen.is_empty() { flotilla_mesh::default_listen(4001, psk.is_none()) } else { listen };
            let opts = ServeOptions {
                store: store.store,
                max_bytes: store.max_bytes,
                trust_root: store.trust_root,
                listen,
                bootstrap,
                mdns: !no_mdns,
                kademlia: !no_kademlia,
                prefetch,
                psk,
                import,
                stats_every,
                max_upload_rate,
                announce_every,
                metrics,
                corrupt: test_corrupt,
            };
            cache::serve(opts, shutdown_signal()).await.context("serving")?;
        }
        Command::Import { store, export } => {
            let root = cache::load_trust_root(&store.trust_root)?;
            let db = DiskStore::open(&store.store, store.max_bytes).context("opening the store")?;
            let r = cache::import(&db, &export, &root).with_context(|| format!("importing {}", export.display()))?;
            let offered = r.directive_basis_points.map_or_else(
                || "no rollout directive".to_owned(),
                |bp| format!("offered to {}% of devices", f64::from(bp) / 100.0),
            );
            println!("imported {} {}: {} chunks, {} new; {offered}", r.product, r.version, r.chunks, r.added);
        }
    }
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) else {
        let _ = ctrl_c.await;
        return;
    };
    tokio::select! {
        _ = ctrl_c => {}
        _ = term.recv() => {}
    }
}
