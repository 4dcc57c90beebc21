//! Real processes: coordinator, CLI, site caches and agents.

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex, Once};
use std::time::{Duration, Instant};

use serde_json::Value;

pub(crate) const SECRET: &str = "enroll-secret-0123456789";
pub(crate) const ADMIN: &str = "admin-token-for-mesh-tests-0123456789abcdef";
pub(crate) const PRODUCT: &str = "board";

/// The site cache under test.
pub(crate) fn mesh_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_flotilla-mesh"))
}

static BUILD: Once = Once::new();

/// A workspace binary next to ours, built (or brought up to date) once per test run: the
/// agent must be the one with this tree's mesh code, never a stale build.
pub(crate) fn workspace_bin(name: &str) -> PathBuf {
    BUILD.call_once(|| {
        // A benchmark runs from the release directory: its processes are release builds too.
        let release = mesh_bin().parent().is_some_and(|d| d.ends_with("release"));
        let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args(["build", "-p", "flotilla-coordinator", "-p", "flotilla-publisher", "-p", "flotilla-agent"])
            .args(release.then_some("--release"))
            .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
            .status()
            .expect("run cargo build");
        assert!(status.success(), "building the coordinator, the CLI and the agent failed");
    });
    let path = mesh_bin().parent().expect("target dir").join(name);
    assert!(path.exists(), "{} is missing", path.display());
    path
}

/// A command for `bin`, run in network namespace `ns` when given (`ip netns exec` execs the
/// binary, so killing the child kills it).
pub(crate) fn in_netns(ns: Option<&str>, bin: &Path) -> Command {
    match ns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(bin);
            c
        }
        None => Command::new(bin),
    }
}

/// Polls `f` until it returns `Some`, failing the test after `deadline`.
pub(crate) fn wait_for<T>(what: &str, deadline: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(start.elapsed() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub(crate) fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd.output().expect("spawn");
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

pub(crate) fn json_of(out: &Output) -> Value {
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().rev().find(|l| l.trim_start().starts_with('{')).unwrap_or("null");
    serde_json::from_str(line).unwrap_or(Value::Null)
}

/// A running coordinator process.
pub(crate) struct Coordinator {
    pub(crate) url: String,
    _data: tempfile::TempDir,
    child: Child,
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Coordinator {
    pub(crate) fn start() -> Self {
        Self::start_in(None, "127.0.0.1:0")
    }

    /// Starts the coordinator in network namespace `ns` (None: this one), listening on `listen`.
    pub(crate) fn start_in(ns: Option<&str>, listen: &str) -> Self {
        Self::start_with_data(ns, listen, tempfile::tempdir().expect("tmp"))
    }

    /// Stops the process and hands back its data directory (database, rollout key).
    pub(crate) fn stop(mut self) -> tempfile::TempDir {
        std::mem::replace(&mut self._data, tempfile::tempdir().expect("tmp"))
    }

    /// The coordinator's `rollout`-role signing key.
    pub(crate) fn rollout_key(&self) -> PathBuf {
        self._data.path().join("rollout-key.pem")
    }

    /// Starts the coordinator on the data directory of an earlier one.
    pub(crate) fn start_with_data(ns: Option<&str>, listen: &str, data: tempfile::TempDir) -> Self {
        let mut child = in_netns(ns, &workspace_bin("flotilla-coordinator"))
            .env("FLOTILLA_DATA_DIR", data.path())
            .env("FLOTILLA_LISTEN", listen)
            .env("FLOTILLA_ADMIN_TOKEN", ADMIN)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the coordinator");
        let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        let url = loop {
            let line = lines.next().expect("coordinator exited before listening").expect("read stdout");
            if let Some(url) = line.strip_prefix("listening on ") {
                break url.trim().to_owned();
            }
        };
        std::thread::spawn(move || for _ in lines {});
        Self { url, _data: data, child }
    }

    /// Bytes the origin served so far (chunks and indexes), from its `/metrics`.
    pub(crate) fn bytes_served(&self) -> u64 {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        let text = rt.block_on(async {
            let _ = rustls::crypto::ring::default_provider().install_default();
            reqwest::get(format!("{}/metrics", self.url)).await.expect("metrics").text().await.expect("metrics body")
        });
        text.lines()
            .find_map(|l| l.strip_prefix("flotilla_object_bytes_served_total "))
            .and_then(|v| v.trim().parse().ok())
            .expect("flotilla_object_bytes_served_total in /metrics")
    }
}

/// A publisher with keys, a trust root and the product, driven through the CLI.
pub(crate) struct Publisher {
    url: String,
    pub(crate) dir: tempfile::TempDir,
    api_key: String,
}

impl Publisher {
    pub(crate) fn new(coord: &Coordinator) -> Self {
        let dir = tempfile::tempdir().expect("tmp");
        let mut p = Self { url: coord.url.clone(), dir, api_key: String::new() };
        for name in ["root", "release"] {
            run_ok(p.cli(ADMIN).args(["keys", "generate", "--out"]).arg(p.path(&format!("{name}.pem"))));
        }
        run_ok(
            p.cli(ADMIN)
                .args(["root", "init", "--root-key"])
                .arg(p.path("root.pem"))
                .arg("--release-key")
                .arg(p.path("release.pem"))
                .arg("--out")
                .arg(p.path("root.json")),
        );
        let out = run_ok(
            p.cli(ADMIN)
                .args(["product", "create", PRODUCT, "--trust-root"])
                .arg(p.path("root.json"))
                .args(["--enrollment-secret", SECRET]),
        );
        p.api_key = json_of(&out)["api_key"].as_str().expect("api key").to_owned();
        p
    }

    pub(crate) fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn cli(&self, token: &str) -> Command {
        let mut c = Command::new(workspace_bin("flotilla"));
        c.env("FLOTILLA_CONFIG_DIR", self.path("cli-config"))
            .env("HOME", self.dir.path())
            .args(["--json", "--url", &self.url, "--token", token]);
        c
    }

    /// Publishes an image at 100 %; returns the release id.
    pub(crate) fn release(&self, version: &str, image: &Path) -> i64 {
        let out = run_ok(
            self.cli(&self.api_key)
                .args(["release", "--product", PRODUCT, "--version", version, "--image"])
                .arg(image)
                .arg("--key")
                .arg(self.path("release.pem"))
                .args(["--rollout", "100"]),
        );
        let v = json_of(&out);
        v["id"].as_i64().or_else(|| v["release"]["id"].as_i64()).unwrap_or_else(|| panic!("release id in {v}"))
    }

    /// `flotilla export ID DIR`.
    pub(crate) fn export(&self, id: i64, out: &Path) {
        self.export_with(id, out, &[]);
    }

    /// `flotilla export ID DIR ARGS…`.
    pub(crate) fn export_with(&self, id: i64, out: &Path, args: &[&std::ffi::OsStr]) {
        run_ok(self.cli(&self.api_key).args(["export", &id.to_string()]).arg(out).args(args));
    }
}

/// A deterministic image: pseudo-random with compressible stretches.
pub(crate) fn image(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|i| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            if (i / 8192) % 3 == 0 { b"flotilla "[i % 9] } else { (x >> 29) as u8 }
        })
        .collect()
}

/// A running `flotilla-mesh serve`.
pub(crate) struct SiteCache {
    pub(crate) addr: String,
    _store: tempfile::TempDir,
    child: Child,
    stats: Arc<Mutex<String>>,
}

impl Drop for SiteCache {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl SiteCache {
    /// Starts a cache on loopback that imports `export` first; `corrupt` (`flip`, `wrong`)
    /// makes it a malicious peer serving bad chunks.
    pub(crate) fn start(trust_root: &Path, export: &Path, corrupt: Option<&str>) -> Self {
        let store = tempfile::tempdir().expect("tmp");
        let args = ["--listen", "/ip4/127.0.0.1/tcp/0", "--no-mdns", "--import"].map(std::ffi::OsStr::new);
        let mut args = args.to_vec();
        args.push(export.as_os_str());
        Self::start_with(None, store, trust_root, &args, corrupt)
    }

    /// Starts `serve` in network namespace `ns` on the store `store` with `args`.
    pub(crate) fn start_with(
        ns: Option<&str>,
        store: tempfile::TempDir,
        trust_root: &Path,
        args: &[&std::ffi::OsStr],
        corrupt: Option<&str>,
    ) -> Self {
        let mut cmd = in_netns(ns, &mesh_bin());
        cmd.arg("serve")
            .arg("--store")
            .arg(store.path())
            .arg("--trust-root")
            .arg(trust_root)
            .args(["--stats-every", "100ms"])
            .args(args)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        if let Some(how) = corrupt {
            cmd.env("FLOTILLA_MESH_TEST_CORRUPT", how);
        } else {
            cmd.env_remove("FLOTILLA_MESH_TEST_CORRUPT");
        }
        let mut child = cmd.spawn().expect("start flotilla-mesh");
        let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        let addr = loop {
            let line = lines.next().expect("flotilla-mesh exited before listening").expect("read stdout");
            if let Some(a) = line.strip_prefix("listening on ") {
                break a.trim().to_owned();
            }
        };
        let stats = Arc::new(Mutex::new(String::new()));
        let last = stats.clone();
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                if line.starts_with("stats ") {
                    *last.lock().unwrap_or_else(|e| e.into_inner()) = line;
                }
            }
        });
        Self { addr, _store: store, child, stats }
    }

    /// A counter from the latest `stats` line.
    pub(crate) fn stat(&self, name: &str) -> Option<u64> {
        let line = self.stats.lock().unwrap_or_else(|e| e.into_inner()).clone();
        line.split_whitespace().find_map(|kv| kv.strip_prefix(name)?.strip_prefix('=')?.parse().ok())
    }
}

/// A device with a `file` slot pair and the mesh configured.
pub(crate) struct Agent {
    pub(crate) dir: tempfile::TempDir,
}

impl Agent {
    /// On loopback without mDNS; `bootstrap`: peer addresses; `deadline`: the `[mesh] deadline`.
    pub(crate) fn new(coord: &Coordinator, trust_root: &Path, id: &str, bootstrap: &[String], deadline: &str) -> Self {
        let boot: Vec<String> = bootstrap.iter().map(|a| format!("\"{a}\"")).collect();
        let mesh = format!(
            "enabled = true\nmdns = false\nlisten = [\"/ip4/127.0.0.1/tcp/0\"]\nbootstrap = [{}]\ndeadline = \"{deadline}\"\n",
            boot.join(", ")
        );
        Self::with_mesh(coord, trust_root, id, &mesh)
    }

    /// With `mesh` as the body of the config's `[mesh]` section.
    pub(crate) fn with_mesh(coord: &Coordinator, trust_root: &Path, id: &str, mesh: &str) -> Self {
        Self::with_url(&coord.url, trust_root, id, mesh)
    }

    /// Configured for the coordinator at `url` (which need not be running).
    pub(crate) fn with_url(url: &str, trust_root: &Path, id: &str, mesh: &str) -> Self {
        let dir = tempfile::tempdir().expect("tmp");
        let p = dir.path();
        std::fs::copy(trust_root, p.join("trust-root.json")).expect("copy root");
        let text = format!(
            "coordinator = \"{url}\"\nproduct = \"{PRODUCT}\"\nenrollment_secret = \"{SECRET}\"\n\
             trust_root = \"{root}\"\nstate_dir = \"{state}\"\nfetch_attempts = 3\nparallel_downloads = 4\n\
             poll_interval = \"1h\"\npoll_jitter = \"0s\"\n[device_id]\nvalue = \"{id}\"\n\
             [slots]\nkind = \"file\"\na = \"{a}\"\nb = \"{b}\"\n\
             [bootloader]\nkind = \"env-file\"\npath = \"{env}\"\nbooted = \"simulate\"\n\
             [mesh]\n{mesh}",
            root = p.join("trust-root.json").display(),
            state = p.join("state").display(),
            a = p.join("slot-a.img").display(),
            b = p.join("slot-b.img").display(),
            env = p.join("bootenv").display(),
        );
        std::fs::write(p.join("agent.toml"), text).expect("write config");
        Self { dir }
    }

    /// `check-once --json` as a child process (stdout and stderr piped).
    pub(crate) fn spawn_check(&self) -> Child {
        Command::new(workspace_bin("flotilla-agent"))
            .arg("--config")
            .arg(self.dir.path().join("agent.toml"))
            .args(["check-once", "--json"])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn agent")
    }

    /// The daemon (`run`) in network namespace `ns`; logs go to `agent.log` in its directory.
    pub(crate) fn spawn_run(&self, ns: Option<&str>) -> Child {
        let log = std::fs::File::create(self.dir.path().join("agent.log")).expect("log file");
        in_netns(ns, &workspace_bin("flotilla-agent"))
            .arg("--config")
            .arg(self.dir.path().join("agent.toml"))
            .arg("run")
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn agent")
    }

    /// `status --json` (reads the state directory only).
    pub(crate) fn status(&self) -> Value {
        let out = run_ok(
            Command::new(workspace_bin("flotilla-agent"))
                .arg("--config")
                .arg(self.dir.path().join("agent.toml"))
                .args(["status", "--json"])
                .env("RUST_LOG", "error"),
        );
        serde_json::from_slice(&out.stdout).expect("status json")
    }

    pub(crate) fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("agent.log")).unwrap_or_default()
    }

    pub(crate) fn slot(&self, name: &str) -> Vec<u8> {
        std::fs::read(self.dir.path().join(format!("slot-{name}.img"))).unwrap_or_default()
    }
}

/// Waits for a `check-once` child (failing after `limit`, a liveness bound only); returns
/// its JSON report and its log.
pub(crate) fn finish(child: Child, limit: Duration) -> (Value, String) {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let out = rx.recv_timeout(limit).expect("the agent did not finish").expect("agent output");
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "agent failed ({}):\n{log}", out.status);
    (json_of(&out), log)
}
