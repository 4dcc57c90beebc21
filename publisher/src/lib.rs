//! The `flotilla` command for publishers and operators.
//!
//! A publisher turns a build (an OS image, or an app bundle packed as a deterministic tar)
//! into content-defined chunks, asks the coordinator which it lacks, uploads only those,
//! signs the release manifest with its `release` keys and publishes it; operators steer the
//! rollout; `export` writes a release for offline sites and `verify` checks one.
//!
//! # Layout
//! - [`cli`]: arguments (clap).
//! - [`config`]: stored login and where the CLI looks for URL and token.
//! - [`client`]: the coordinator API, errors mapped to exit codes.
//! - [`keys`]: signing keys and trust roots.
//! - [`release`]: the publish pipeline.
//! - [`delta`]: patches from earlier releases (`release`, `patch`).
//! - [`ops`]: products, releases, rollout control, rollback, devices.
//! - [`export`]: offline export and verification.
//! - [`error`]: error kinds and exit codes.

#![deny(missing_docs, rustdoc::broken_intra_doc_links, unreachable_pub)]
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod cli;
pub mod client;
pub mod config;
pub mod delta;
pub mod error;
pub mod export;
pub mod keys;
pub mod ops;
pub mod release;

use std::process::ExitCode;

use clap::CommandFactory as _;
use serde_json::{Value, json};

use crate::cli::{Cli, Command, DevicesCommand, KeysCommand, ReleasesCommand, RootCommand};
use crate::client::Client;
use crate::error::{CliError, CliResult};

fn client(cli: &Cli) -> CliResult<Client> {
    let (url, token) = config::resolve(cli.url.clone(), cli.token.clone())?;
    Client::new(url, token)
}

/// Runs a parsed command line and returns the exit code.
pub async fn run(cli: Cli) -> ExitCode {
    let json_out = cli.json;
    match dispatch(&cli).await {
        Ok(v) => {
            print_value(json_out, &v);
            ExitCode::SUCCESS
        }
        Err(e) => {
            if json_out {
                println!("{}", json!({ "error": { "kind": e.kind_name(), "message": e.message } }));
            } else {
                eprintln!("error: {}", e.message);
            }
            e.exit_code()
        }
    }
}

fn print_value(json_out: bool, v: &Value) {
    if v.is_null() {
        return;
    }
    if json_out {
        println!("{v}");
        return;
    }
    let bold = std::io::IsTerminal::is_terminal(&std::io::stdout());
    if let Some(rows) = v.get("releases").and_then(Value::as_array) {
        let cols = ["id", "channel", "version", "code", "state", "percent", "healthy", "failed", "archived"];
        let cells = rows.iter().map(|r| {
            vec![
                cell(&r["id"]),
                cell(&r["channel"]),
                cell(&r["version"]),
                cell(&r["version_code"]),
                cell(&r["rollout"]["state"]),
                cell(&r["rollout"]["percent"]),
                cell(&r["rollout"]["healthy"]),
                cell(&r["rollout"]["failed"]),
                cell(&r["archived"]),
            ]
        });
        print_table(&cols, cells.collect(), bold);
        return;
    }
    if let Some(rows) = v.get("devices").and_then(Value::as_array) {
        let cols = ["device", "channel", "hardware", "version", "code", "last seen (unix)"];
        let cells = rows.iter().map(|r| {
            vec![
                cell(&r["device_id"]),
                cell(&r["channel"]),
                cell(&r["hardware"]),
                cell(&r["version"]),
                cell(&r["version_code"]),
                cell(&r["last_seen"]),
            ]
        });
        print_table(&cols, cells.collect(), bold);
        return;
    }
    match v {
        Value::Object(map) => {
            for (k, val) in map {
                let text = match val {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                if bold {
                    println!("\x1b[1m{k:>16}\x1b[0m  {text}");
                } else {
                    println!("{k:>16}  {text}");
                }
            }
        }
        other => println!("{}", serde_json::to_string_pretty(other).unwrap_or_default()),
    }
}

fn cell(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Left-aligned columns sized to their widest cell.
fn print_table(cols: &[&str], rows: Vec<Vec<String>>, bold: bool) {
    let mut width: Vec<usize> = cols.iter().map(|c| c.len()).collect();
    for r in &rows {
        for (w, c) in width.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        cells.iter().zip(&width).map(|(c, w)| format!("{c:<w$}")).collect::<Vec<_>>().join("  ").trim_end().to_owned()
    };
    let header = line(cols.iter().map(|c| (*c).to_owned()).collect());
    if bold {
        println!("\x1b[1m{header}\x1b[0m");
    } else {
        println!("{header}");
    }
    if rows.is_empty() {
        println!("(none)");
    }
    for r in rows {
        println!("{}", line(r));
    }
}

async fn dispatch(cli: &Cli) -> CliResult<Value> {
    let quiet = cli.json;
    match &cli.command {
        Command::Login(args) => {
            let mut login = config::load()?;
            if let Some(u) = &args.to {
                login.url = Some(u.trim_end_matches('/').to_owned());
            }
            if let Some(t) = &args.with_token {
                login.token = Some(t.clone());
            }
            let url = login.url.clone().ok_or_else(|| CliError::usage("give --to URL"))?;
            let c = Client::new(url.clone(), login.token.clone())?;
            c.get("/healthz").await.ok();
            let path = config::save(&login)?;
            Ok(json!({ "url": url, "config": path }))
        }
        Command::Keys(KeysCommand::Generate { out, name, algorithm }) => keys::generate(out.clone(), name, algorithm),
        Command::Keys(KeysCommand::Show { key }) => keys::show(key),
        Command::Root(RootCommand::Init(args)) => {
            let c = if args.rollout_key.is_none() { Some(client(cli)?) } else { None };
            keys::root_init(args, c.as_ref()).await
        }
        Command::Root(RootCommand::Rotate(args)) => keys::root_rotate(args),
        Command::Root(RootCommand::Push { product, trust_root }) => {
            let text = std::fs::read_to_string(trust_root).map_err(error::io_err(trust_root))?;
            client(cli)?
                .json(
                    reqwest::Method::PUT,
                    &format!("/v1/products/{product}/trust-root"),
                    Some(&json!({ "trust_root": text })),
                )
                .await
        }
        Command::Product(cmd) => ops::product(&client(cli)?, cmd).await,
        Command::Release(args) => release::run(&client(cli)?, args, quiet).await,
        Command::Patch(args) => delta::patch(&client(cli)?, args, quiet).await,
        Command::Releases(ReleasesCommand::List { product, channel }) => {
            let mut q = Vec::new();
            if let Some(p) = product {
                q.push(format!("product={p}"));
            }
            if let Some(c) = channel {
                q.push(format!("channel={c}"));
            }
            client(cli)?.get(&format!("/v1/releases?{}", q.join("&"))).await
        }
        Command::Releases(ReleasesCommand::Show(a)) => {
            let mut v = client(cli)?.get(&format!("/v1/releases/{}", a.id)).await?;
            if let Value::Object(m) = &mut v {
                m.remove("manifest");
            }
            Ok(v)
        }
        Command::Status(a) => {
            let v = client(cli)?.get(&format!("/v1/releases/{}", a.id)).await?;
            Ok(json!({
                "release": v["id"], "version": v["version"], "version_code": v["version_code"],
                "state": v["rollout"]["state"], "reason": v["rollout"]["reason"], "stage": v["rollout"]["stage"],
                "percent": v["rollout"]["percent"], "reports": v["rollout"]["reports"], "healthy": v["rollout"]["healthy"],
                "failed": v["rollout"]["failed"], "failure_rate": v["rollout"]["failure_rate"], "bytes": v["bytes"],
            }))
        }
        Command::Rollout(cmd) => ops::rollout(&client(cli)?, cmd).await,
        Command::Rollback(args) => ops::rollback(&client(cli)?, args).await,
        Command::Devices(DevicesCommand::List { product }) => {
            let q = product.as_ref().map(|p| format!("?product={p}")).unwrap_or_default();
            client(cli)?.get(&format!("/v1/devices{q}")).await
        }
        Command::Export(a) => export::export_any(&client(cli)?, a, quiet).await,
        Command::Verify(a) => export::verify_any(
            a.dir.as_deref(),
            a.trust_root.as_deref(),
            a.image.as_deref(),
            a.manifest.as_deref(),
            quiet,
        ),
        Command::Completions { shell } => {
            clap_complete::generate(*shell, &mut Cli::command(), "flotilla", &mut std::io::stdout());
            Ok(Value::Null)
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn cli_definition_is_consistent() {
        use clap::CommandFactory as _;
        super::Cli::command().debug_assert();
    }
}
