//! Boot selection: which slot boots, how many tries it has, and which one is running.
//!
//! `file` (and later `block`) slots keep RAUC-style variables in a bootloader environment:
//! `BOOT_ORDER` (slots in priority order, e.g. `B A`) and `BOOT_A_LEFT` / `BOOT_B_LEFT` (tries
//! left). The bootloader boots the first slot of `BOOT_ORDER` with tries left, decrementing
//! and saving its counter before loading the kernel. Every change here is one transaction
//! with all variables (`fw_setenv -s -`, one `grub-editenv set`, one atomic file replace, one
//! hook call), never a series of single-variable writes.
//!
//! `dir` slots have no bootloader: the `current` symlink is the selection, swapped
//! atomically (new link, rename over the old one, fsync the directory).

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::config::{BootedSource, BootloaderConfig, BootloaderKind};
use crate::crash;
use crate::durable::{fsync_dir, write_atomic};
use crate::slot::SlotName;

/// Variable names.
const ORDER: &str = "BOOT_ORDER";

fn left_var(s: SlotName) -> String {
    format!("BOOT_{}_LEFT", s.as_str())
}

/// Boot control errors.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BootError {
    /// Reading or writing the environment or pointer failed.
    #[error("bootloader state {what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The cause.
        source: std::io::Error,
    },
    /// A bootloader tool failed.
    #[error("`{command}` failed: {detail}")]
    Tool {
        /// The command.
        command: String,
        /// Its exit status and stderr.
        detail: String,
    },
    /// The running slot cannot be told.
    #[error("cannot tell which slot is running: {0}")]
    UnknownBootedSlot(String),
    /// Refused: it would point the device at the slot being written.
    #[error("slot {0} is the one selected to run; refusing to write it")]
    TargetIsRunning(SlotName),
}

/// The RAUC-style variables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootEnv {
    /// Slots in boot priority order.
    pub order: Vec<SlotName>,
    /// Tries left for A and B.
    pub left: [u32; 2],
}

fn idx(s: SlotName) -> usize {
    match s {
        SlotName::A => 0,
        SlotName::B => 1,
    }
}

impl BootEnv {
    /// A device as it leaves the factory: slot A only.
    pub fn factory(attempts: u32) -> Self {
        Self { order: vec![SlotName::A], left: [attempts, 0] }
    }

    fn from_vars(vars: &BTreeMap<String, String>, attempts: u32) -> Self {
        let Some(order) = vars.get(ORDER) else { return Self::factory(attempts) };
        let order: Vec<SlotName> = order.split_whitespace().filter_map(SlotName::parse).collect();
        let left = |s| vars.get(&left_var(s)).and_then(|v| v.trim().parse().ok()).unwrap_or(0);
        Self { order, left: [left(SlotName::A), left(SlotName::B)] }
    }

    fn to_vars(&self) -> Vec<(String, String)> {
        vec![
            (ORDER.to_owned(), self.order.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(" ")),
            (left_var(SlotName::A), self.left[0].to_string()),
            (left_var(SlotName::B), self.left[1].to_string()),
        ]
    }

    /// Tries left for a slot.
    pub fn tries(&self, s: SlotName) -> u32 {
        self.left[idx(s)]
    }

    /// The slot the bootloader would boot now.
    pub fn selected(&self) -> Option<SlotName> {
        self.order.iter().copied().find(|s| self.tries(*s) > 0)
    }

    fn set(&mut self, s: SlotName, tries: u32) {
        self.left[idx(s)] = tries;
    }
}

/// Where the variables live.
#[derive(Debug, Clone)]
enum EnvStore {
    File(PathBuf),
    Uboot,
    Grub(PathBuf),
    Hook(String),
}

fn run_tool(mut cmd: Command, stdin: Option<String>) -> Result<String, BootError> {
    let shown = format!("{cmd:?}");
    cmd.stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|e| BootError::Tool { command: shown.clone(), detail: e.to_string() })?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input.as_bytes())
            .map_err(|e| BootError::Tool { command: shown.clone(), detail: e.to_string() })?;
    }
    let out =
        child.wait_with_output().map_err(|e| BootError::Tool { command: shown.clone(), detail: e.to_string() })?;
    if !out.status.success() {
        return Err(BootError::Tool {
            command: shown,
            detail: format!("{}: {}", out.status, String::from_utf8_lossy(&out.stderr).trim()),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn parse_kv(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().trim_matches('"').to_owned()))
        .collect()
}

impl EnvStore {
    fn read(&self) -> Result<BTreeMap<String, String>, BootError> {
        match self {
            Self::File(path) => match std::fs::read_to_string(path) {
                Ok(text) => Ok(parse_kv(&text)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeMap::new()),
                Err(source) => Err(BootError::Io { what: format!("reading {}", path.display()), source }),
            },
            Self::Uboot => {
                let mut cmd = Command::new("fw_printenv");
                cmd.args([ORDER, "BOOT_A_LEFT", "BOOT_B_LEFT"]);
                // fw_printenv fails when a variable is unset; a fresh environment is the factory state.
                Ok(run_tool(cmd, None).map(|t| parse_kv(&t)).unwrap_or_default())
            }
            Self::Grub(path) => {
                let mut cmd = Command::new("grub-editenv");
                cmd.arg(path).arg("list");
                Ok(parse_kv(&run_tool(cmd, None)?))
            }
            Self::Hook(hook) => {
                let mut cmd = Command::new("sh");
                cmd.arg("-c").arg(format!("{hook} get"));
                Ok(parse_kv(&run_tool(cmd, None)?))
            }
        }
    }

    fn write(&self, vars: &[(String, String)]) -> Result<(), BootError> {
        match self {
            Self::File(path) => {
                let text: String = vars.iter().map(|(k, v)| format!("{k}={v}\n")).collect();
                write_atomic(path, text.as_bytes())
                    .map_err(|source| BootError::Io { what: format!("writing {}", path.display()), source })?;
            }
            Self::Uboot => {
                // One transaction: `fw_setenv -s -` reads "NAME VALUE" lines from stdin.
                let script: String = vars.iter().map(|(k, v)| format!("{k} {v}\n")).collect();
                let mut cmd = Command::new("fw_setenv");
                cmd.args(["-s", "-"]);
                run_tool(cmd, Some(script))?;
            }
            Self::Grub(path) => {
                let mut cmd = Command::new("grub-editenv");
                cmd.arg(path).arg("set").args(vars.iter().map(|(k, v)| format!("{k}={v}")));
                run_tool(cmd, None)?;
            }
            Self::Hook(hook) => {
                let input: String = vars.iter().map(|(k, v)| format!("{k}={v}\n")).collect();
                let mut cmd = Command::new("sh");
                cmd.arg("-c").arg(format!("{hook} set"));
                run_tool(cmd, Some(input))?;
            }
        }
        crash::point("env-written");
        Ok(())
    }
}

/// Boot selection for the configured slots.
#[derive(Debug, Clone)]
pub enum BootControl {
    /// A bootloader environment.
    Env {
        /// Where the variables live.
        store: EnvStoreHandle,
        /// How the running slot is found.
        booted: BootedSource,
        /// The kernel command line file.
        cmdline: PathBuf,
        /// Tries a newly activated slot gets.
        attempts: u32,
    },
    /// The `current` symlink of `dir` slots.
    Pointer {
        /// The bundle root.
        root: PathBuf,
    },
}

/// An opaque environment store.
#[derive(Debug, Clone)]
pub struct EnvStoreHandle(EnvStore);

impl BootControl {
    /// For `file` slots.
    pub fn env(c: &BootloaderConfig, attempts: u32) -> Self {
        let store = match c.kind {
            BootloaderKind::EnvFile => EnvStore::File(c.path.clone().unwrap_or_default()),
            BootloaderKind::Uboot => EnvStore::Uboot,
            BootloaderKind::Grub => EnvStore::Grub(c.path.clone().unwrap_or_default()),
            BootloaderKind::Command => EnvStore::Hook(c.command.clone().unwrap_or_default()),
        };
        Self::Env { store: EnvStoreHandle(store), booted: c.booted, cmdline: c.cmdline.clone(), attempts }
    }

    /// For `dir` slots.
    pub fn pointer(root: &Path) -> Self {
        Self::Pointer { root: root.to_path_buf() }
    }

    /// The environment (`Env` only).
    ///
    /// # Errors
    /// Reading the store.
    pub fn read_env(&self) -> Result<Option<BootEnv>, BootError> {
        match self {
            Self::Env { store, attempts, .. } => Ok(Some(BootEnv::from_vars(&store.0.read()?, *attempts))),
            Self::Pointer { .. } => Ok(None),
        }
    }

    fn write_env(&self, env: &BootEnv) -> Result<(), BootError> {
        if let Self::Env { store, .. } = self {
            store.0.write(&env.to_vars())?;
        }
        Ok(())
    }

    fn attempts(&self) -> u32 {
        match self {
            Self::Env { attempts, .. } => *attempts,
            Self::Pointer { .. } => 1,
        }
    }

    fn pointer_target(root: &Path) -> Option<SlotName> {
        std::fs::read_link(root.join("current")).ok().and_then(|t| t.to_str().and_then(SlotName::parse))
    }

    fn swap_pointer(root: &Path, to: SlotName) -> Result<(), BootError> {
        let io = |what: &str| {
            let what = what.to_owned();
            move |source| BootError::Io { what, source }
        };
        std::fs::create_dir_all(root).map_err(io("creating the bundle root"))?;
        let tmp = root.join("current.new");
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(to.lower(), &tmp).map_err(io("creating the new pointer"))?;
        std::fs::rename(&tmp, root.join("current")).map_err(io("swapping the pointer"))?;
        fsync_dir(root).map_err(io("syncing the bundle root"))?;
        crash::point("env-written");
        Ok(())
    }

    /// The slot selected to run now, without side effects (status, planning).
    ///
    /// # Errors
    /// Reading the store.
    pub fn selected(&self, active: SlotName) -> Result<SlotName, BootError> {
        match self {
            Self::Env { .. } => Ok(self.read_env()?.and_then(|e| e.selected()).unwrap_or(active)),
            Self::Pointer { root } => Ok(Self::pointer_target(root).unwrap_or(active)),
        }
    }

    /// Step 1 of an install: the target slot is taken out of the boot order (tries 0) before
    /// a byte of it is written.
    ///
    /// # Errors
    /// The store, or a target that is the selected slot of a pointer.
    pub fn mark_unbootable(&self, target: SlotName) -> Result<(), BootError> {
        match self {
            Self::Env { .. } => {
                let mut env = self.read_env()?.unwrap_or_else(|| BootEnv::factory(self.attempts()));
                let active = target.other();
                let before = env.clone();
                env.order.retain(|s| *s != target);
                if !env.order.contains(&active) {
                    env.order.insert(0, active);
                }
                if env.tries(active) == 0 {
                    env.set(active, self.attempts());
                }
                env.set(target, 0);
                if env != before {
                    self.write_env(&env)?;
                }
                Ok(())
            }
            Self::Pointer { root } => match Self::pointer_target(root) {
                Some(s) if s == target => Err(BootError::TargetIsRunning(target)),
                _ => Ok(()),
            },
        }
    }

    /// The switch: `target` first in the boot order with a full set of tries, the other slot
    /// kept as the fallback. One transaction; idempotent.
    ///
    /// # Errors
    /// The store.
    pub fn activate(&self, target: SlotName) -> Result<(), BootError> {
        match self {
            Self::Env { .. } => {
                let n = self.attempts();
                let mut env = BootEnv { order: vec![target, target.other()], left: [0, 0] };
                env.set(target, n);
                env.set(target.other(), n);
                self.write_env(&env)
            }
            Self::Pointer { root } => Self::swap_pointer(root, target),
        }
    }

    /// Marks the running slot good: its tries are reset and it stays first.
    ///
    /// # Errors
    /// The store.
    pub fn mark_good(&self, slot: SlotName) -> Result<(), BootError> {
        match self {
            Self::Env { .. } => {
                let mut env = self.read_env()?.unwrap_or_else(|| BootEnv::factory(self.attempts()));
                let before = env.clone();
                env.order.retain(|s| *s != slot);
                env.order.insert(0, slot);
                env.set(slot, self.attempts());
                if env != before {
                    self.write_env(&env)?;
                }
                Ok(())
            }
            Self::Pointer { root } => {
                if Self::pointer_target(root) != Some(slot) {
                    Self::swap_pointer(root, slot)?;
                }
                Ok(())
            }
        }
    }

    /// Rolls back: `bad` leaves the boot order, `good` is first with full tries.
    ///
    /// # Errors
    /// The store.
    pub fn rollback(&self, good: SlotName, bad: SlotName) -> Result<(), BootError> {
        match self {
            Self::Env { .. } => {
                let mut env = BootEnv { order: vec![good], left: [0, 0] };
                env.set(good, self.attempts());
                env.set(bad, 0);
                self.write_env(&env)?;
            }
            Self::Pointer { root } => Self::swap_pointer(root, good)?,
        }
        crash::point("rolled-back-env");
        Ok(())
    }

    /// The slot this boot runs, as `boot-check` sees it early at boot. With
    /// `booted = "simulate"` this plays the bootloader: the first slot of `BOOT_ORDER` with
    /// tries left has its counter decremented and saved before it "boots".
    ///
    /// # Errors
    /// The store, or a command line that names no slot.
    pub fn boot(&self, active: SlotName) -> Result<SlotName, BootError> {
        match self {
            Self::Env { booted: BootedSource::Simulate, .. } => {
                let mut env = self.read_env()?.unwrap_or_else(|| BootEnv::factory(self.attempts()));
                let Some(slot) = env.selected() else {
                    // No slot has tries left: a real bootloader would enter rescue mode.
                    tracing::error!("no slot has boot tries left; booting the committed slot");
                    return Ok(active);
                };
                env.set(slot, env.tries(slot) - 1);
                self.write_env(&env)?;
                Ok(slot)
            }
            Self::Env { booted: BootedSource::Cmdline, cmdline, .. } => {
                let text = std::fs::read_to_string(cmdline)
                    .map_err(|e| BootError::UnknownBootedSlot(format!("{}: {e}", cmdline.display())))?;
                text.split_whitespace()
                    .filter_map(|w| w.strip_prefix("rauc.slot=").or_else(|| w.strip_prefix("flotilla.slot=")))
                    .find_map(SlotName::parse)
                    .ok_or_else(|| {
                        BootError::UnknownBootedSlot(format!(
                            "{} has no rauc.slot= or flotilla.slot= (A or B)",
                            cmdline.display()
                        ))
                    })
            }
            Self::Pointer { root } => Ok(Self::pointer_target(root).unwrap_or(active)),
        }
    }

    /// The variables or pointer, for `status`.
    pub fn describe(&self) -> serde_json::Value {
        match self {
            Self::Env { .. } => match self.read_env() {
                Ok(Some(env)) => serde_json::json!({
                    "BOOT_ORDER": env.order.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(" "),
                    "BOOT_A_LEFT": env.left[0],
                    "BOOT_B_LEFT": env.left[1],
                }),
                Ok(None) => serde_json::Value::Null,
                Err(e) => serde_json::json!({ "error": e.to_string() }),
            },
            Self::Pointer { root } => {
                serde_json::json!({ "current": Self::pointer_target(root).map(|s| s.lower()) })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file_control(dir: &Path) -> BootControl {
        let c = BootloaderConfig {
            kind: BootloaderKind::EnvFile,
            path: Some(dir.join("env")),
            booted: BootedSource::Simulate,
            ..BootloaderConfig::default()
        };
        BootControl::env(&c, 3)
    }

    #[test]
    fn rauc_cycle_with_simulated_bootloader() {
        let dir = tempfile::tempdir().unwrap();
        let b = file_control(dir.path());
        assert_eq!(b.boot(SlotName::A).unwrap(), SlotName::A);
        b.mark_unbootable(SlotName::B).unwrap();
        b.activate(SlotName::B).unwrap();
        // Three tries, then fallback to A.
        for _ in 0..3 {
            assert_eq!(b.boot(SlotName::A).unwrap(), SlotName::B);
        }
        assert_eq!(b.boot(SlotName::A).unwrap(), SlotName::A);
        b.rollback(SlotName::A, SlotName::B).unwrap();
        let env = b.read_env().unwrap().unwrap();
        assert_eq!(env.order, vec![SlotName::A]);
        assert_eq!(env.tries(SlotName::B), 0);
    }

    #[test]
    fn pointer_swap() {
        let dir = tempfile::tempdir().unwrap();
        let p = BootControl::pointer(dir.path());
        assert_eq!(p.selected(SlotName::A).unwrap(), SlotName::A);
        p.activate(SlotName::B).unwrap();
        assert_eq!(p.boot(SlotName::A).unwrap(), SlotName::B);
        assert!(matches!(p.mark_unbootable(SlotName::B), Err(BootError::TargetIsRunning(SlotName::B))));
    }
}
