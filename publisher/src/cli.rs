//! Command-line arguments.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// Flotilla: publish OS images and app bundles as signed, chunked releases and steer their
/// rollouts.
#[derive(Debug, Parser)]
#[command(name = "flotilla", version, about)]
pub struct Cli {
    /// Print machine-readable JSON instead of text.
    #[arg(long, global = true)]
    pub json: bool,
    /// Coordinator URL (else FLOTILLA_URL, else the stored login).
    #[arg(long, global = true)]
    pub url: Option<String>,
    /// Token (else FLOTILLA_TOKEN, else the stored login).
    #[arg(long, global = true, hide_env_values = true)]
    pub token: Option<String>,
    /// The command.
    #[command(subcommand)]
    pub command: Command,
}

/// Commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Store the coordinator URL and token in ~/.config/flotilla/config.toml (0600).
    Login(LoginArgs),
    /// Signing keys: generate, show.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Trust roots: create the first one, rotate keys.
    #[command(subcommand)]
    Root(RootCommand),
    /// Products: create, list.
    #[command(subcommand)]
    Product(ProductCommand),
    /// Chunk, sign and publish a release.
    Release(Box<ReleaseArgs>),
    /// Add a patch from an earlier release to a published one (re-signs its manifest).
    Patch(Box<crate::delta::PatchArgs>),
    /// List or show releases.
    #[command(subcommand)]
    Releases(ReleasesCommand),
    /// Rollout state of a release: stage, percent, reports, failure rate, bytes by source.
    Status(IdArg),
    /// Steer a rollout.
    #[command(subcommand)]
    Rollout(RolloutCommand),
    /// Publish earlier content again under a new version_code (no upload), halting a release.
    Rollback(RollbackArgs),
    /// List devices.
    #[command(subcommand)]
    Devices(DevicesCommand),
    /// Write everything an offline site needs (trust root, manifest, index, chunks) to a directory.
    Export(ExportArgs),
    /// Verify an exported release, or a local image against a manifest.
    Verify(VerifyArgs),
    /// Print shell completions.
    Completions {
        /// Shell.
        shell: clap_complete::Shell,
    },
}

/// `login`.
#[derive(Debug, Args)]
pub struct LoginArgs {
    /// Coordinator URL, e.g. http://coordinator:8080.
    #[arg(long = "to", value_name = "URL")]
    pub to: Option<String>,
    /// An API key or token; an API key is exchanged for a session token only on use.
    #[arg(long = "with-token", value_name = "TOKEN")]
    pub with_token: Option<String>,
}

/// `keys`.
#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Generate a signing key (PKCS#8 PEM, 0600). Private keys never leave this machine.
    Generate {
        /// Output file (default ~/.config/flotilla/keys/<name>.pem).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Key name when --out is not given.
        #[arg(long, default_value = "release")]
        name: String,
        /// ed25519 (default) or rsa (RSA-4096-PSS).
        #[arg(long, default_value = "ed25519")]
        algorithm: String,
    },
    /// Show a key's id, algorithm and public key.
    Show {
        /// Key file (private or public PEM).
        key: PathBuf,
    },
}

/// `root`.
#[derive(Debug, Subcommand)]
pub enum RootCommand {
    /// Create a version-1 trust root.
    Init(RootInitArgs),
    /// Make the next trust root (version N+1), signed by the current root keys and the new ones.
    Rotate(RootRotateArgs),
    /// Install a rotated trust root on the coordinator (admin token); devices fetch the chain.
    Push {
        /// Product.
        #[arg(long)]
        product: String,
        /// The new trust root file (from `flotilla root rotate`).
        trust_root: PathBuf,
    },
}

/// `root init`.
#[derive(Debug, Args)]
pub struct RootInitArgs {
    /// Root keys (private PEM; they sign the root). Repeatable.
    #[arg(long = "root-key", required = true)]
    pub root_keys: Vec<PathBuf>,
    /// Release (publisher) keys, private or public PEM. Repeatable.
    #[arg(long = "release-key", required = true)]
    pub release_keys: Vec<PathBuf>,
    /// Coordinator rollout public key PEM file; default: fetched from the coordinator.
    #[arg(long = "rollout-key")]
    pub rollout_key: Option<PathBuf>,
    /// Root signatures required.
    #[arg(long, default_value_t = 1)]
    pub root_threshold: u32,
    /// Release signatures required.
    #[arg(long, default_value_t = 1)]
    pub release_threshold: u32,
    /// Validity, e.g. 365d.
    #[arg(long, default_value = "365d", value_parser = humantime::parse_duration)]
    pub expires_in: std::time::Duration,
    /// Output file.
    #[arg(long, default_value = "root.json")]
    pub out: PathBuf,
}

/// `root rotate`.
#[derive(Debug, Args)]
pub struct RootRotateArgs {
    /// The current trust root.
    #[arg(long)]
    pub current: PathBuf,
    /// Current root keys that sign the rotation (a threshold of them). Repeatable.
    #[arg(long = "sign-with", required = true)]
    pub sign_with: Vec<PathBuf>,
    /// New root keys (private PEM; they sign too). Repeatable; default: keep the current ones.
    #[arg(long = "root-key")]
    pub root_keys: Vec<PathBuf>,
    /// New release keys (replace the current list). Repeatable; default: keep.
    #[arg(long = "release-key")]
    pub release_keys: Vec<PathBuf>,
    /// Validity of the new root.
    #[arg(long, default_value = "365d", value_parser = humantime::parse_duration)]
    pub expires_in: std::time::Duration,
    /// Output file.
    #[arg(long)]
    pub out: PathBuf,
}

/// `product`.
#[derive(Debug, Subcommand)]
pub enum ProductCommand {
    /// Create a product with its trust root (admin token).
    Create {
        /// Name.
        name: String,
        /// Trust root file (from `flotilla root init`).
        #[arg(long)]
        trust_root: PathBuf,
        /// Secret devices present to enroll.
        #[arg(long, env = "FLOTILLA_ENROLLMENT_SECRET", hide_env_values = true)]
        enrollment_secret: Option<String>,
    },
    /// List products (admin token).
    List,
}

/// `release`.
#[derive(Debug, Args)]
pub struct ReleaseArgs {
    /// Product.
    #[arg(long)]
    pub product: String,
    /// Channel.
    #[arg(long, default_value = "production")]
    pub channel: String,
    /// Semantic version, e.g. 1.4.2.
    #[arg(long)]
    pub version: String,
    /// version_code (default: one more than the channel's latest).
    #[arg(long)]
    pub version_code: Option<u64>,
    /// A raw OS image file.
    #[arg(long, conflicts_with_all = ["dir", "react_native"])]
    pub image: Option<PathBuf>,
    /// A bundle directory (packed as a deterministic archive).
    #[arg(long, conflicts_with = "react_native")]
    pub dir: Option<PathBuf>,
    /// Run `npx react-native bundle` in the current project and publish its output.
    #[arg(long)]
    pub react_native: bool,
    /// React Native platform.
    #[arg(long, default_value = "android")]
    pub platform: String,
    /// React Native entry file.
    #[arg(long, default_value = "index.js")]
    pub entry_file: String,
    /// Signing key(s) (default ~/.config/flotilla/keys/release.pem). Repeatable.
    #[arg(long = "key")]
    pub keys: Vec<PathBuf>,
    /// Devices install without asking.
    #[arg(long)]
    pub mandatory: bool,
    /// Rollout: a percentage (manual advance) or `staged` for the product's stage plan.
    #[arg(long, default_value = "staged")]
    pub rollout: String,
    /// Lowest native shell version that can run this bundle.
    #[arg(long)]
    pub min_native_version: Option<String>,
    /// Lowest agent version that can install it.
    #[arg(long)]
    pub min_agent_version: Option<String>,
    /// Hardware models (repeatable; default any).
    #[arg(long = "hardware")]
    pub hardware: Vec<String>,
    /// Platforms that may install it, e.g. linux, android, ios (repeatable; default any).
    #[arg(long = "target-platform", value_name = "PLATFORM")]
    pub target_platforms: Vec<String>,
    /// CPU architectures that may install it, as Rust names them: x86_64, aarch64, arm,
    /// riscv64 (repeatable; default any).
    #[arg(long = "arch", value_name = "ARCH")]
    pub architectures: Vec<String>,
    /// Manifest validity, e.g. 90d.
    #[arg(long, default_value = "90d", value_parser = humantime::parse_duration)]
    pub expires: std::time::Duration,
    /// security_version (anti-rollback floor devices raise after commit).
    #[arg(long, default_value_t = 0)]
    pub security_version: u32,
    /// Release notes.
    #[arg(long)]
    pub notes: Option<String>,
    /// Parallel uploads.
    #[arg(long, default_value_t = 8)]
    pub parallel: usize,
    /// Patches from earlier releases.
    #[command(flatten)]
    pub delta: crate::delta::DeltaArgs,
}

/// `releases`.
#[derive(Debug, Subcommand)]
pub enum ReleasesCommand {
    /// List releases.
    List {
        /// Product.
        #[arg(long)]
        product: Option<String>,
        /// Channel.
        #[arg(long)]
        channel: Option<String>,
    },
    /// Show one release.
    Show(IdArg),
}

/// A release id.
#[derive(Debug, Args)]
pub struct IdArg {
    /// Release id.
    pub id: i64,
}

/// `rollout`.
#[derive(Debug, Subcommand)]
pub enum RolloutCommand {
    /// Stop widening the rollout.
    Pause {
        /// Release id.
        id: i64,
        /// Why (goes to the audit log).
        #[arg(long)]
        reason: Option<String>,
    },
    /// Continue a paused rollout.
    Resume(IdArg),
    /// Move to the next stage now.
    Advance(IdArg),
    /// Set the share of devices.
    Set {
        /// Release id.
        id: i64,
        /// Percent, 0-100.
        percent: f64,
    },
    /// Stop offering the release.
    Halt {
        /// Release id.
        id: i64,
        /// Why.
        #[arg(long)]
        reason: Option<String>,
    },
}

/// `rollback`.
#[derive(Debug, Args)]
pub struct RollbackArgs {
    /// The release to halt.
    pub id: i64,
    /// The release whose content to publish again (default: the previous one on the channel).
    #[arg(long)]
    pub to: Option<i64>,
    /// New version (default: the target's version with a `-rollback.<code>` suffix).
    #[arg(long)]
    pub version: Option<String>,
    /// Signing key(s). Repeatable.
    #[arg(long = "key")]
    pub keys: Vec<PathBuf>,
    /// Manifest validity.
    #[arg(long, default_value = "90d", value_parser = humantime::parse_duration)]
    pub expires: std::time::Duration,
}

/// `devices`.
#[derive(Debug, Subcommand)]
pub enum DevicesCommand {
    /// List devices.
    List {
        /// Product.
        #[arg(long)]
        product: Option<String>,
    },
}

/// `export`.
#[derive(Debug, Args)]
pub struct ExportArgs {
    /// Release id.
    pub id: i64,
    /// Output directory (created; must be empty), or a new `FILE.tar`.
    pub out: PathBuf,
    /// Sign a rollout directive into the export (`directive.json`) with this `rollout`-role
    /// key (the coordinator's `rollout-key.pem`): offline sites then apply the staged rollout
    /// themselves.
    #[arg(long)]
    pub directive_key: Option<PathBuf>,
    /// The directive's share of devices in percent (default: the release's rollout percent).
    #[arg(long, requires = "directive_key")]
    pub percent: Option<f64>,
    /// The directive's bucketing salt, 32 hex digits (default: a random one).
    #[arg(long, requires = "directive_key")]
    pub salt: Option<flotilla_core::rollout::RolloutSalt>,
    /// How long the directive stays valid.
    #[arg(long, default_value = "30d", value_parser = humantime::parse_duration)]
    pub directive_ttl: std::time::Duration,
}

/// `verify`.
#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// An exported release: directory or `.tar` file.
    pub dir: Option<PathBuf>,
    /// The trust root to check against (default: the export's own, with a warning).
    #[arg(long)]
    pub trust_root: Option<PathBuf>,
    /// A local image to check against --manifest.
    #[arg(long, requires = "manifest")]
    pub image: Option<PathBuf>,
    /// A manifest envelope file.
    #[arg(long)]
    pub manifest: Option<PathBuf>,
}
