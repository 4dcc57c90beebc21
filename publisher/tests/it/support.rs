//! A real coordinator process and a CLI runner with its own config directory.

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;

use serde_json::Value;

/// Database engine behind the coordinator.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Engine {
    Sqlite,
    Postgres,
}

/// Runs the test body on both engines.
macro_rules! both_engines {
    ($name:ident, $body:ident) => {
        mod $name {
            #[test]
            fn sqlite() {
                super::$body(crate::support::Engine::Sqlite);
            }
            #[test]
            fn postgres() {
                super::$body(crate::support::Engine::Postgres);
            }
        }
    };
}
pub(crate) use both_engines;

/// `target/<profile>` of this test binary (`.../debug/deps/it-HASH` → `.../debug`).
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    exe.parent().and_then(Path::parent).expect("target/<profile>/deps/it-*").to_path_buf()
}

/// The coordinator binary, built (or brought up to date) once per test run with the same
/// cargo and target directory as this test. Cargo gives `CARGO_BIN_EXE_*` only for the tested
/// package's own binaries, so the coordinator's comes from a nested build.
pub(crate) fn coordinator_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let dir = profile_dir();
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "--quiet", "--locked", "-p", "flotilla-coordinator", "--bin", "flotilla-coordinator"])
            .current_dir(env!("CARGO_MANIFEST_DIR"));
        if dir.file_name().is_some_and(|n| n == "release") {
            cmd.arg("--release");
        }
        if let Some(target) = dir.parent() {
            cmd.env("CARGO_TARGET_DIR", target);
        }
        let status = cmd.status().expect("run cargo build for the coordinator");
        assert!(status.success(), "building flotilla-coordinator failed");
        let bin = dir.join("flotilla-coordinator");
        assert!(bin.is_file(), "{} missing after build", bin.display());
        bin
    })
}

/// A fresh database URL for `engine` (a new PostgreSQL database per test).
fn database_url(engine: Engine, data: &Path) -> String {
    match engine {
        Engine::Sqlite => format!("sqlite://{}?mode=rwc", data.join("flotilla.db").display()),
        Engine::Postgres => {
            let base = std::env::var("FLOTILLA_TEST_PG_URL").expect(
                "FLOTILLA_TEST_PG_URL is not set: run the tests with `bash scripts/test.sh`, which starts PostgreSQL",
            );
            let mut suffix = [0u8; 6];
            getrandom::fill(&mut suffix).expect("random");
            let name = format!("flotilla_p_{}", hex::encode(suffix));
            tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime").block_on(async {
                sqlx::any::install_default_drivers();
                let mut conn = <sqlx::AnyConnection as sqlx::Connection>::connect(&base)
                    .await
                    .expect("connect to the test PostgreSQL");
                sqlx::Executor::execute(&mut conn, sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
                    .await
                    .expect("create database");
            });
            let (prefix, _) = base.rsplit_once('/').expect("database URL with a path");
            format!("{prefix}/{name}")
        }
    }
}

/// A running `flotilla-coordinator`; killed on drop.
pub(crate) struct Coordinator {
    child: Child,
    pub(crate) url: String,
    pub(crate) admin: String,
    pub(crate) data: PathBuf,
    pub(crate) database_url: String,
    _dir: tempfile::TempDir,
}

impl Coordinator {
    pub(crate) fn start(engine: Engine) -> Self {
        Self::start_with(engine, None, &[])
    }

    /// With an existing database (another replica's) and extra environment.
    pub(crate) fn start_with(engine: Engine, database: Option<&str>, env: &[(&str, &Path)]) -> Self {
        let dir = tempfile::tempdir().expect("tmp");
        let data = dir.path().join("data");
        std::fs::create_dir_all(&data).expect("mkdir");
        let db_url = database.map_or_else(|| database_url(engine, &data), str::to_owned);
        let mut cmd = Command::new(coordinator_bin());
        cmd.env("FLOTILLA_DATA_DIR", &data)
            .env("FLOTILLA_LISTEN", "127.0.0.1:0")
            .env("DATABASE_URL", &db_url)
            .env("RUST_LOG", "warn")
            .env_remove("FLOTILLA_CONFIG")
            .env_remove("S3_BUCKET");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::inherit()).spawn().expect("spawn coordinator");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut line).expect("read");
        let url = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("coordinator did not start: {line:?}"))
            .to_owned();
        // A second replica on an existing database finds the admin token there and writes none.
        let admin = std::fs::read_to_string(data.join("admin-token")).unwrap_or_default().trim().to_owned();
        Self { child, url, admin, data, database_url: db_url, _dir: dir }
    }

    /// Number of chunk objects the coordinator does not have among `ids`.
    pub(crate) fn missing(&self, ids: &[String]) -> usize {
        let v = http_json(
            "POST",
            &format!("{}/v1/chunks/missing", self.url),
            &self.admin,
            Some(serde_json::json!({ "ids": ids })),
        );
        v["missing"].as_array().expect("missing list").len()
    }
}

impl Coordinator {
    /// Stops the process now (kill -9).
    pub(crate) fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One blocking JSON request (tests only).
pub(crate) fn http_json(method: &str, url: &str, token: &str, body: Option<Value>) -> Value {
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime").block_on(async {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = reqwest::Client::new();
        let mut req = client.request(method.parse().expect("method"), url).bearer_auth(token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.expect("request");
        let status = resp.status();
        let v: Value = resp.json().await.expect("json body");
        assert!(status.is_success(), "{method} {url}: {status} {v}");
        v
    })
}

/// The CLI with a private config dir, pointed at a coordinator.
pub(crate) struct Flotilla {
    pub(crate) home: tempfile::TempDir,
    pub(crate) url: String,
    pub(crate) token: Option<String>,
}

/// What one CLI run gave.
#[derive(Debug)]
pub(crate) struct Run {
    pub(crate) code: i32,
    pub(crate) json: Value,
    pub(crate) stderr: String,
}

impl Flotilla {
    pub(crate) fn new(c: &Coordinator) -> Self {
        Self { home: tempfile::tempdir().expect("tmp"), url: c.url.clone(), token: Some(c.admin.clone()) }
    }

    pub(crate) fn path(&self, name: &str) -> PathBuf {
        self.home.path().join(name)
    }

    pub(crate) fn command(&self) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_flotilla"));
        cmd.env("FLOTILLA_CONFIG_DIR", self.home.path().join("config"))
            .env("FLOTILLA_URL", &self.url)
            .env_remove("FLOTILLA_TOKEN")
            .env_remove("FLOTILLA_TEST_STALL_AFTER_UPLOADS")
            .current_dir(self.home.path());
        if let Some(t) = &self.token {
            cmd.env("FLOTILLA_TOKEN", t);
        }
        cmd
    }

    /// Runs `flotilla --json ARGS`.
    pub(crate) fn run(&self, args: &[&str]) -> Run {
        let out = self.command().arg("--json").args(args).output().expect("run flotilla");
        parse(args, &out)
    }

    /// Runs and expects success; returns the JSON answer.
    pub(crate) fn ok(&self, args: &[&str]) -> Value {
        let r = self.run(args);
        assert_eq!(r.code, 0, "flotilla {args:?} failed (exit {}): {}\n{}", r.code, r.json, r.stderr);
        r.json
    }

    /// Runs and expects exit `code`; returns the error message.
    pub(crate) fn fails(&self, args: &[&str], code: i32) -> String {
        let r = self.run(args);
        assert_eq!(r.code, code, "flotilla {args:?}: expected exit {code}, got {r:?}");
        let msg = r.json["error"]["message"].as_str().unwrap_or_else(|| panic!("no error message: {r:?}"));
        msg.to_owned()
    }

    /// Keys, trust root and product `name`: returns (release key path, trust root path).
    pub(crate) fn setup_product(&self, name: &str) -> (String, String) {
        let root_key = self.path("root.pem");
        let release_key = self.path("release.pem");
        let root = self.path("root.json");
        let s = |p: &Path| p.to_str().expect("utf-8 path").to_owned();
        self.ok(&["keys", "generate", "--out", &s(&root_key)]);
        self.ok(&["keys", "generate", "--out", &s(&release_key)]);
        self.ok(&["root", "init", "--root-key", &s(&root_key), "--release-key", &s(&release_key), "--out", &s(&root)]);
        self.ok(&[
            "product",
            "create",
            name,
            "--trust-root",
            &s(&root),
            "--enrollment-secret",
            "enroll-secret-0123456789",
        ]);
        (s(&release_key), s(&root))
    }
}

fn parse(args: &[&str], out: &Output) -> Run {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let json = if stdout.trim().is_empty() {
        Value::Null
    } else {
        serde_json::from_str(stdout.trim())
            .unwrap_or_else(|e| panic!("flotilla {args:?}: stdout is not one JSON value ({e}): {stdout}"))
    };
    Run { code: out.status.code().unwrap_or(-1), json, stderr: String::from_utf8_lossy(&out.stderr).into_owned() }
}

/// Deterministic incompressible-ish bytes.
pub(crate) fn image(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Writes `bytes` to `path` and returns the path as a string.
pub(crate) fn write(path: &Path, bytes: &[u8]) -> String {
    std::fs::write(path, bytes).expect("write");
    path.to_str().expect("utf-8").to_owned()
}
