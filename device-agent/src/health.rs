//! Boot-health checks: a command, a systemd unit being active, an HTTP probe.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::config::{HealthCheck, HealthConfig};

/// How often a running check command is polled for exit.
const CHILD_POLL: Duration = Duration::from_millis(20);

/// Why the health checks failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("health check {check} failed: {reason}")]
pub struct HealthError {
    /// The check, as configured.
    pub check: String,
    /// What happened.
    pub reason: String,
}

fn run_command(mut cmd: Command, timeout: Duration, shown: &str) -> Result<(), HealthError> {
    let fail = |reason: String| HealthError { check: shown.to_owned(), reason };
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| fail(e.to_string()))?;
    let started = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(status)) if status.success() => return Ok(()),
            Ok(Some(status)) => return Err(fail(format!("exited with {status}"))),
            Ok(None) if started.elapsed() >= timeout => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(fail(format!("still running after {}", humantime::format_duration(timeout))));
            }
            Ok(None) => std::thread::sleep(CHILD_POLL),
            Err(e) => return Err(fail(e.to_string())),
        }
    }
}

async fn run_one(check: &HealthCheck, timeout: Duration) -> Result<(), HealthError> {
    match check {
        HealthCheck::Command(c) => {
            let (c, shown) = (c.clone(), format!("command `{c}`"));
            let mut cmd = Command::new("sh");
            cmd.arg("-c").arg(&c);
            tokio::task::spawn_blocking(move || run_command(cmd, timeout, &shown))
                .await
                .map_err(|e| HealthError { check: "command".into(), reason: e.to_string() })?
        }
        HealthCheck::SystemdUnit(unit) => {
            let shown = format!("systemd unit {unit}");
            let mut cmd = Command::new("systemctl");
            cmd.args(["is-active", "--quiet", unit]);
            tokio::task::spawn_blocking(move || run_command(cmd, timeout, &shown))
                .await
                .map_err(|e| HealthError { check: "systemd unit".into(), reason: e.to_string() })?
        }
        HealthCheck::Http(url) => {
            let fail = |reason: String| HealthError { check: format!("HTTP probe {url}"), reason };
            crate::client::install_crypto_provider();
            let client = reqwest::Client::builder().timeout(timeout).build().map_err(|e| fail(e.to_string()))?;
            let resp = client.get(url).send().await.map_err(|e| fail(e.to_string()))?;
            if resp.status().is_success() { Ok(()) } else { Err(fail(format!("answered {}", resp.status()))) }
        }
    }
}

/// Runs every configured check in order; the first failure is returned.
///
/// # Errors
/// [`HealthError`] naming the failing check.
pub async fn run_checks(config: &HealthConfig) -> Result<(), HealthError> {
    for check in &config.checks {
        run_one(check, config.check_timeout).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn command_checks() {
        let mut c = HealthConfig { checks: vec![HealthCheck::Command("true".into())], ..HealthConfig::default() };
        assert!(run_checks(&c).await.is_ok());
        c.checks.push(HealthCheck::Command("exit 3".into()));
        let e = run_checks(&c).await.unwrap_err();
        assert!(e.reason.contains("exit status: 3"), "{e}");
        c.checks = vec![HealthCheck::Command("sleep 5".into())];
        c.check_timeout = Duration::from_millis(50);
        assert!(run_checks(&c).await.unwrap_err().reason.contains("still running"));
    }
}
