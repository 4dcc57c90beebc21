//! `flotilla-agent`: parses flags and environment, loads the config, dispatches.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use flotilla_agent::agent::{Agent, BootReport, CheckReport};
use flotilla_agent::config::{Config, DEFAULT_CONFIG_PATH, Secret};

/// Flotilla device agent: installs releases into the inactive A/B slot, checks the new slot's
/// health at boot, rolls back by itself.
///
/// Configuration: the TOML file, then these environment variables (which win):
/// FLOTILLA_COORDINATOR_URL, FLOTILLA_PRODUCT, FLOTILLA_CHANNEL, FLOTILLA_ENROLLMENT_SECRET,
/// FLOTILLA_DEVICE_ID, FLOTILLA_STATE_DIR.
#[derive(Debug, Parser)]
#[command(name = "flotilla-agent", version, about)]
struct Cli {
    /// Config file.
    #[arg(long, global = true, env = "FLOTILLA_AGENT_CONFIG", default_value = DEFAULT_CONFIG_PATH)]
    config: PathBuf,
    /// Log filter (tracing's EnvFilter syntax).
    #[arg(long, global = true, env = "RUST_LOG", default_value = "info")]
    log: String,
    /// The command.
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the daemon: check, install, report, forever.
    Run,
    /// One update check and install (for cron and tests).
    CheckOnce {
        /// Print the outcome as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Early at boot: count the attempt, run health checks, commit or roll back.
    /// Exit status: 0 healthy or committed, 2 reboot to retry, 3 rolled back.
    BootCheck {
        /// Print the outcome as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Mark the slot on trial (or on probation) healthy (what an app calls once it runs well).
    MarkGood,
    /// Report a crash of the committed release (an app's crash handler, a systemd
    /// `OnFailure=` hook). During the crash-loop probation it counts toward `crash_limit`;
    /// the last one rolls back. Exit status: 0 counted or nothing on probation, 3 rolled back.
    ReportCrash {
        /// Print the outcome as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show the device's update state.
    Status {
        /// Machine-readable JSON.
        #[arg(long)]
        json: bool,
    },
    /// Install a release from a `flotilla export` directory or .tar file (USB updates).
    Install {
        /// The export: a directory (trust-root.json, manifest.json, index.bin, chunks/) or
        /// the .tar `flotilla export ID FILE.tar` writes.
        path: PathBuf,
        /// Print the outcome as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Send queued events now.
    FlushEvents,
}

/// Applies the environment overrides: the one place the agent reads its environment.
fn load_config(path: &std::path::Path) -> anyhow::Result<Config> {
    let mut config = Config::load(path).with_context(|| format!("loading {}", path.display()))?;
    let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    if let Some(v) = var("FLOTILLA_COORDINATOR_URL") {
        config.coordinator = Some(v);
    }
    if let Some(v) = var("FLOTILLA_PRODUCT") {
        config.product = v;
    }
    if let Some(v) = var("FLOTILLA_CHANNEL") {
        config.channel = v;
    }
    if let Some(v) = var("FLOTILLA_ENROLLMENT_SECRET") {
        config.enrollment_secret = Some(Secret::new(v));
    }
    if let Some(v) = var("FLOTILLA_DEVICE_ID") {
        config.device_id.value = Some(v);
    }
    if let Some(v) = var("FLOTILLA_STATE_DIR") {
        config.state_dir = PathBuf::from(v);
    }
    config.validate()?;
    Ok(config)
}

fn print<T: serde::Serialize + std::fmt::Debug>(json: bool, value: &T, human: String) {
    if json {
        println!("{}", serde_json::to_string(value).unwrap_or_default());
    } else {
        println!("{human}");
    }
}

fn describe_check(r: &CheckReport) -> String {
    match r {
        CheckReport::UpToDate => "up to date".into(),
        CheckReport::Available { version } => format!("release {version} available (auto_install is off)"),
        CheckReport::NativeTooOld { required } => format!("a newer release needs native version {required}"),
        CheckReport::Staged { version, slot, bytes } => format!(
            "installed {version} into slot {slot} (peers {} B, cdn {} B, reused {} B, file {} B, patch {} B); reboot to run it",
            bytes.peer, bytes.cdn, bytes.local, bytes.file, bytes.delta
        ),
        CheckReport::RebootPending { slot } => format!("slot {slot} is staged; reboot to run it"),
        CheckReport::OnTrial => "a slot is on trial; boot-check decides".into(),
        CheckReport::OnProbation { version } => {
            format!("{version} is on crash-loop probation; installs wait until it is over")
        }
    }
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

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let config = load_config(&cli.config)?;
    let agent = Agent::new(config).context("starting the agent")?;
    match cli.command {
        Command::Run => {
            agent.run(shutdown_signal()).await;
            Ok(ExitCode::SUCCESS)
        }
        Command::CheckOnce { json } => {
            let r = agent.check_once().await?;
            print(json, &r, describe_check(&r));
            Ok(ExitCode::SUCCESS)
        }
        Command::Install { path, json } => {
            let r = agent.install_export(&path).await?;
            print(json, &r, describe_check(&r));
            Ok(ExitCode::SUCCESS)
        }
        Command::BootCheck { json } => {
            let r = agent.boot_check().await?;
            let (human, code) = match &r {
                BootReport::Normal { slot } => (format!("slot {slot} running, nothing on trial"), 0),
                BootReport::Committed { slot, version } => (format!("committed {version} in slot {slot}"), 0),
                BootReport::RetryAfterReboot { reason, attempts, limit } => {
                    (format!("trial attempt {attempts} of {limit} failed: {reason}; reboot to retry"), 2)
                }
                BootReport::RebootPending { slot } => (format!("switched to slot {slot}; reboot to run it"), 2),
                BootReport::RolledBack { slot, reason } => (format!("rolled back to slot {slot}: {reason}"), 3),
            };
            print(json, &r, human);
            Ok(ExitCode::from(code))
        }
        Command::ReportCrash { json } => match agent.report_crash().await? {
            Some(r @ BootReport::RolledBack { .. }) => {
                if let BootReport::RolledBack { slot, reason } = &r {
                    print(json, &r, format!("rolled back to slot {slot}: {reason}"));
                }
                Ok(ExitCode::from(3))
            }
            Some(r) => {
                print(json, &r, "crash counted".into());
                Ok(ExitCode::SUCCESS)
            }
            None => {
                print(json, &serde_json::json!({ "outcome": "not_on_probation" }), "nothing is on probation".into());
                Ok(ExitCode::SUCCESS)
            }
        },
        Command::MarkGood => {
            match agent.mark_good()? {
                Some(v) => println!("marked {v} healthy"),
                None => println!("nothing is on trial"),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Status { json } => {
            let s = agent.status()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                let v = |k: &str| s[k].clone();
                println!("device      {} ({} / {})", s["device_id"], s["product"], s["channel"]);
                println!("state       {}", v("state"));
                println!("active slot {}  selected {}", v("active_slot"), v("selected_slot"));
                println!(
                    "installed   {}",
                    s["installed"]["version"].as_str().map_or("nothing yet".to_owned(), |x| format!(
                        "{x} (version_code {})",
                        s["installed"]["version_code"]
                    ))
                );
                if let Some(t) = s["target"]["release"]["version"].as_str() {
                    println!("target      {t} in slot {} (attempts {})", s["target"]["slot"], s["target"]["attempts"]);
                }
                if let Some(e) = s["last_error"].as_str() {
                    println!("last error  {e}");
                }
                println!("bootloader  {}", v("bootloader"));
                if let Some(p) = s["bundle_path"].as_str() {
                    println!("bundle      {p}");
                }
                println!("events      {} queued", v("pending_events"));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::FlushEvents => {
            let n = agent.flush_events().await?;
            println!("sent {n} events");
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(&cli.log))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    // Test hook: abort at a named point, like a power cut (see flotilla_agent::crash).
    if let Ok(spec) = std::env::var("FLOTILLA_AGENT_CRASH_AT")
        && !spec.is_empty()
        && let Err(e) = flotilla_agent::crash::arm_from_spec(&spec)
    {
        eprintln!("flotilla-agent: {e}");
        return ExitCode::from(64);
    }
    // One thread is enough: downloads are I/O-bound and hashing goes to the blocking pool.
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("flotilla-agent: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("flotilla-agent: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn cli_is_consistent() {
        use clap::CommandFactory as _;
        super::Cli::command().debug_assert();
    }
}
