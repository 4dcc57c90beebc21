//! Real processes: the coordinator binary, the `flotilla` CLI, and `flotilla-agent` devices.

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::Value;

pub(crate) const SECRET: &str = "enroll-secret-0123456789";
pub(crate) const ADMIN: &str = "admin-token-for-agent-tests-0123456789abcdef";
pub(crate) const PRODUCT: &str = "board";

/// The agent under test.
pub(crate) fn agent_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_flotilla-agent"))
}

static BUILD: Mutex<bool> = Mutex::new(false);

/// A workspace binary next to the agent's (or, for benches built in release, the debug
/// one), built once if it is missing.
pub(crate) fn workspace_bin(name: &str) -> PathBuf {
    let dir = agent_bin().parent().expect("target dir").to_path_buf();
    let candidates = [dir.join(name), dir.join("../debug").join(name)];
    let found = || candidates.iter().find(|p| p.exists()).cloned();
    let mut built = BUILD.lock().unwrap_or_else(|e| e.into_inner());
    if found().is_none() && !*built {
        let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args(["build", "-p", "flotilla-coordinator", "-p", "flotilla-publisher"])
            .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
            .status()
            .expect("run cargo build");
        assert!(status.success(), "building the coordinator and the CLI failed");
        *built = true;
    }
    found().unwrap_or_else(|| panic!("{name} is missing next to {}", dir.display()))
}

/// Polls `f` until it returns `Some`, failing the test after `deadline`.
/// The coordinator's test CA, certificate (localhost, 127.0.0.1) and key.
pub(crate) fn tls_fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../coordinator/tests/fixtures/tls").join(name)
}

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

/// A running coordinator process.
pub(crate) struct Coordinator {
    pub(crate) url: String,
    pub(crate) data: tempfile::TempDir,
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
        Self::start_bin(&workspace_bin("flotilla-coordinator"))
    }

    /// A coordinator serving HTTPS with the test certificate of `tls_fixture`.
    pub(crate) fn start_tls() -> Self {
        Self::start_with(
            &workspace_bin("flotilla-coordinator"),
            &[("FLOTILLA_TLS_CERT", tls_fixture("server.pem")), ("FLOTILLA_TLS_KEY", tls_fixture("server.key"))],
        )
    }

    /// Starts the given coordinator binary (the install bench passes a release build).
    pub(crate) fn start_bin(bin: &Path) -> Self {
        Self::start_with(bin, &[])
    }

    fn start_with(bin: &Path, env: &[(&str, PathBuf)]) -> Self {
        let data = tempfile::tempdir().expect("tmp");
        let mut child = Command::new(bin)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .env("FLOTILLA_DATA_DIR", data.path())
            .env("FLOTILLA_LISTEN", "127.0.0.1:0")
            .env("FLOTILLA_ADMIN_TOKEN", ADMIN)
            .env("FLOTILLA_EVALUATOR_INTERVAL", "1s")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the coordinator");
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = BufReader::new(stdout).lines();
        let url = loop {
            let line = lines.next().expect("coordinator exited before listening").expect("read stdout");
            if let Some(url) = line.strip_prefix("listening on ") {
                break url.trim().to_owned();
            }
        };
        // Keep draining stdout so the coordinator never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Self { url, data, child }
    }

    /// The stored object file of a chunk or index (`chunks` or `indexes`).
    pub(crate) fn object_path(&self, kind: &str, id: &str) -> PathBuf {
        self.data.path().join("objects").join(kind).join(&id[..2]).join(id)
    }
}

/// A publisher: keys, trust root and product on a coordinator, driven through the CLI.
pub(crate) struct Publisher {
    pub(crate) url: String,
    pub(crate) dir: tempfile::TempDir,
    pub(crate) api_key: String,
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
    serde_json::from_str(line).unwrap_or_else(|_| serde_json::from_str(&text).unwrap_or(Value::Null))
}

impl Publisher {
    pub(crate) fn new(coord: &Coordinator) -> Self {
        let mut p = Self::new_root_only(coord);
        let out = run_ok(
            p.cli(ADMIN)
                .args(["product", "create", PRODUCT, "--trust-root"])
                .arg(p.path("root.json"))
                .args(["--enrollment-secret", SECRET]),
        );
        p.api_key = json_of(&out)["api_key"].as_str().expect("api key").to_owned();
        p
    }

    /// Keys and a trust root only (no product): a publisher the devices do not know.
    pub(crate) fn new_root_only(coord: &Coordinator) -> Self {
        let dir = tempfile::tempdir().expect("tmp");
        let p = Self { url: coord.url.clone(), dir, api_key: String::new() };
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
        p
    }

    pub(crate) fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub(crate) fn cli(&self, token: &str) -> Command {
        let mut c = Command::new(workspace_bin("flotilla"));
        c.env("FLOTILLA_CONFIG_DIR", self.path("cli-config"))
            // Trusted for `https://` coordinators (Coordinator::start_tls); unused over HTTP.
            .env("FLOTILLA_CA_CERT", tls_fixture("ca.pem"))
            .env("HOME", self.dir.path())
            .args(["--json", "--url", &self.url, "--token", token]);
        c
    }

    /// Publishes an image file or bundle directory at 100 %; returns the CLI's JSON.
    pub(crate) fn release(&self, version: &str, payload: &Path, extra: &[&str]) -> Value {
        let flag = if payload.is_dir() { "--dir" } else { "--image" };
        let out = run_ok(
            self.cli(&self.api_key)
                .args(["release", "--product", PRODUCT, "--version", version, flag])
                .arg(payload)
                .arg("--key")
                .arg(self.path("release.pem"))
                .args(if extra.contains(&"--rollout") { &[][..] } else { &["--rollout", "100"][..] })
                .args(extra),
        );
        json_of(&out)
    }

    /// `PUT /v1/products/{product}/stages`: the product's staged-rollout plan.
    pub(crate) fn set_stages(&self, stages: Value) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        let status = rt.block_on(async {
            flotilla_agent::client::install_crypto_provider();
            reqwest::Client::new()
                .put(format!("{}/v1/products/{PRODUCT}/stages", self.url))
                .bearer_auth(&self.api_key)
                .json(&serde_json::json!({ "stages": stages }))
                .send()
                .await
                .expect("set stages")
                .status()
        });
        assert!(status.is_success(), "setting the stage plan: {status}");
    }

    pub(crate) fn show(&self, id: i64) -> Value {
        json_of(&run_ok(self.cli(ADMIN).args(["releases", "show", &id.to_string()])))
    }

    pub(crate) fn export(&self, id: i64, out: &Path) {
        run_ok(self.cli(&self.api_key).args(["export", &id.to_string()]).arg(out));
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

/// `base` with `n` scattered edits of a few bytes each.
pub(crate) fn edited(base: &[u8], n: usize, salt: u8) -> Vec<u8> {
    let mut v = base.to_vec();
    for k in 0..n {
        let at = (k * 7919 * 131 + 4096) % (v.len() - 16);
        for (j, b) in v[at..at + 8].iter_mut().enumerate() {
            *b = b.wrapping_add(salt).wrapping_add(j as u8 + 1);
        }
    }
    v
}

/// Slot layout of a test device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SlotKind {
    File,
    Dir,
}

/// A device: a state directory, two slots, a bootloader env file, a config.
pub(crate) struct Device {
    pub(crate) dir: tempfile::TempDir,
    pub(crate) kind: SlotKind,
}

#[derive(Debug, Clone)]
pub(crate) struct DeviceOptions {
    pub(crate) id: String,
    pub(crate) hardware: Option<String>,
    pub(crate) health: String,
    pub(crate) fetch_attempts: u32,
    pub(crate) boot_attempts: u32,
    /// Chunk downloads in flight.
    pub(crate) parallel_downloads: usize,
    /// Extra top-level config lines.
    pub(crate) extra: String,
}

impl Default for DeviceOptions {
    fn default() -> Self {
        Self {
            id: "dev-1".into(),
            hardware: Some("rpi4".into()),
            health: String::new(),
            fetch_attempts: 3,
            boot_attempts: 3,
            parallel_downloads: 4,
            extra: String::new(),
        }
    }
}

impl Device {
    pub(crate) fn new(coord: &Coordinator, trust_root: &Path, kind: SlotKind, opts: &DeviceOptions) -> Self {
        let dir = tempfile::tempdir().expect("tmp");
        std::fs::copy(trust_root, dir.path().join("trust-root.json")).expect("copy root");
        let d = Self { dir, kind };
        d.write_config(&coord.url, opts);
        d
    }

    pub(crate) fn write_config(&self, url: &str, opts: &DeviceOptions) {
        let p = self.dir.path();
        let slots = match self.kind {
            SlotKind::File => format!(
                "[slots]\nkind = \"file\"\na = \"{}\"\nb = \"{}\"\n[bootloader]\nkind = \"env-file\"\npath = \"{}\"\nbooted = \"simulate\"\n",
                p.join("slot-a.img").display(),
                p.join("slot-b.img").display(),
                p.join("bootenv").display()
            ),
            SlotKind::Dir => format!("[slots]\nkind = \"dir\"\nroot = \"{}\"\n", p.join("bundles").display()),
        };
        let hardware = opts.hardware.as_ref().map(|h| format!("hardware = \"{h}\"\n")).unwrap_or_default();
        let text = format!(
            "coordinator = \"{url}\"\nproduct = \"{PRODUCT}\"\nenrollment_secret = \"{SECRET}\"\n{hardware}\
             trust_root = \"{}\"\nstate_dir = \"{}\"\nfetch_attempts = {}\nparallel_downloads = {}\n{}\n\
             [device_id]\nvalue = \"{}\"\n{slots}[health]\nboot_attempts = {}\ncheck_timeout = \"10s\"\n{}\n",
            p.join("trust-root.json").display(),
            p.join("state").display(),
            opts.fetch_attempts,
            opts.parallel_downloads,
            opts.extra,
            opts.id,
            opts.boot_attempts,
            opts.health,
        );
        std::fs::write(p.join("agent.toml"), text).expect("write config");
    }

    pub(crate) fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub(crate) fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(agent_bin());
        c.arg("--config").arg(self.path("agent.toml")).args(args).env("RUST_LOG", "warn");
        c.env_remove("FLOTILLA_AGENT_CRASH_AT");
        c
    }

    pub(crate) fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().expect("spawn agent")
    }

    pub(crate) fn ok(&self, args: &[&str]) -> Value {
        json_of(&run_ok(&mut self.cmd(args)))
    }

    pub(crate) fn check_once(&self) -> Value {
        self.ok(&["check-once", "--json"])
    }

    /// `boot-check --json`: (exit code, report).
    pub(crate) fn boot_check(&self) -> (i32, Value) {
        let out = self.run(&["boot-check", "--json"]);
        let code = out.status.code().unwrap_or(-1);
        assert!([0, 2, 3].contains(&code), "boot-check failed: {}", String::from_utf8_lossy(&out.stderr));
        (code, json_of(&out))
    }

    pub(crate) fn status(&self) -> Value {
        let out = run_ok(&mut self.cmd(&["status", "--json"]));
        serde_json::from_slice(&out.stdout).expect("status json")
    }

    /// The image bytes of a slot (`a`/`b`): the file, or the bundle archive.
    pub(crate) fn slot_image(&self, slot: &str) -> Vec<u8> {
        let slot = slot.to_lowercase();
        let path = match self.kind {
            SlotKind::File => self.path(&format!("slot-{slot}.img")),
            SlotKind::Dir => self.path(&format!("bundles/{slot}.tar")),
        };
        std::fs::read(path).unwrap_or_default()
    }

    pub(crate) fn downloads(&self) -> Vec<String> {
        std::fs::read_to_string(self.path("state/downloads.log"))
            .unwrap_or_default()
            .lines()
            .map(|l| l.split_whitespace().next().unwrap_or_default().to_owned())
            .collect()
    }

    /// The slot the (simulated) bootloader would boot now, or the `dir` pointer.
    pub(crate) fn selected_slot(&self) -> String {
        self.status()["selected_slot"].as_str().expect("selected slot").to_owned()
    }
}

/// SHA-256 hex of bytes.
pub(crate) fn sha256_hex(data: &[u8]) -> String {
    flotilla_core::ids::Sha256Digest::of(data).to_hex()
}

/// Chunk ids and lengths of an image as the publisher cuts it.
pub(crate) fn chunks_of(data: &[u8], params: flotilla_core::chunking::ChunkParams) -> Vec<(String, u64)> {
    let c = flotilla_core::chunking::Chunker::new(params).chunk_reader(data).expect("chunk");
    c.index.entries().iter().map(|e| (e.id.to_hex(), u64::from(e.len))).collect()
}
