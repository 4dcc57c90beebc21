//! `flotilla`: parses the command line and runs it.

use clap::Parser as _;

#[tokio::main(flavor = "multi_thread", worker_threads = 4)]
async fn main() -> std::process::ExitCode {
    flotilla_publisher::run(flotilla_publisher::cli::Cli::parse()).await
}
