//! The publisher's whole job against a real coordinator: keys → trust root → product →
//! releases of an image and of a directory → list/status → rollout control → rollback →
//! export → verify.

use std::os::unix::fs::PermissionsExt as _;

use serde_json::Value;

use crate::support::{Coordinator, Engine, Flotilla, both_engines, image, write};

both_engines!(publish_steer_rollback_export, publish_steer_rollback_export);

fn publish_steer_rollback_export(engine: Engine) {
    let coord = Coordinator::start(engine);
    let cli = Flotilla::new(&coord);
    let (key, root) = cli.setup_product("kiosk");
    let mode = std::fs::metadata(&key).expect("key").permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "private keys are 0600");
    let shown = cli.ok(&["keys", "show", &key]);
    assert_eq!(shown["algorithm"], "ed25519", "{shown}");
    let products = cli.ok(&["product", "list"]);
    assert!(products.to_string().contains("kiosk"), "{products}");

    // v1: an 8 MiB image; every chunk is new.
    let v1 = image(1, 8 << 20);
    let img1 = write(&cli.path("v1.img"), &v1);
    let r1 = cli.ok(&["release", "--product", "kiosk", "--image", &img1, "--version", "1.0.0", "--key", &key]);
    assert_eq!(r1["version_code"], 1, "default version_code starts at 1: {r1}");
    assert_eq!(r1["payload_kind"], "raw");
    assert_eq!(r1["uploaded_chunks"], r1["chunks"], "first release uploads everything: {r1}");
    assert_eq!(r1["uploaded_bytes"], 8 << 20);
    let id1 = r1["id"].as_i64().expect("id");

    // v2: 256 KiB changed in the middle; only the chunks around it go up.
    let mut v2 = v1.clone();
    v2[4 << 20..(4 << 20) + (256 << 10)].copy_from_slice(&image(2, 256 << 10));
    let img2 = write(&cli.path("v2.img"), &v2);
    let r2 = cli.ok(&[
        "release",
        "--product",
        "kiosk",
        "--image",
        &img2,
        "--version",
        "1.1.0",
        "--key",
        &key,
        "--mandatory",
        "--rollout",
        "10",
    ]);
    assert_eq!(r2["version_code"], 2, "next version_code is one more than the channel's latest: {r2}");
    let sent = r2["uploaded_bytes"].as_u64().expect("bytes");
    assert!(sent > 0 && sent <= (256 << 10) + 2 * (256 << 10), "only the changed region's chunks are sent: {r2}");
    assert!(r2["reused_chunks"].as_u64().expect("reused") > 0, "{r2}");
    assert_eq!(r2["rollout"], 10.0, "{r2}");
    let id2 = r2["id"].as_i64().expect("id");

    // A bundle directory on the beta channel, packed as a deterministic archive.
    let app = cli.path("app");
    std::fs::create_dir_all(app.join("assets")).expect("mkdir");
    std::fs::write(app.join("index.android.bundle"), image(3, 300 << 10)).expect("write");
    std::fs::write(app.join("assets/logo.png"), image(4, 20 << 10)).expect("write");
    let r3 = cli.ok(&[
        "release",
        "--product",
        "kiosk",
        "--channel",
        "beta",
        "--dir",
        app.to_str().expect("utf-8"),
        "--version",
        "2.0.0-beta.1",
        "--key",
        &key,
        "--min-native-version",
        "3.1.0",
    ]);
    assert_eq!(r3["payload_kind"], "archive", "{r3}");
    assert_eq!(r3["version_code"], 1, "version codes count per channel: {r3}");

    let list = cli.ok(&["releases", "list", "--product", "kiosk"]);
    assert_eq!(list["releases"].as_array().expect("releases").len(), 3, "{list}");
    // Without --json (and not on a terminal): a plain table, no escape codes.
    let human = cli.command().args(["releases", "list", "--product", "kiosk"]).output().expect("run");
    let text = String::from_utf8(human.stdout).expect("utf-8");
    assert!(text.starts_with("id  channel"), "{text}");
    assert!(text.lines().any(|l| l.contains("1.1.0") && l.contains("active") && l.contains("10")), "{text}");
    assert!(!text.contains('\x1b'), "no colour when stdout is not a terminal: {text:?}");
    let beta = cli.ok(&["releases", "list", "--product", "kiosk", "--channel", "beta"]);
    assert_eq!(beta["releases"].as_array().expect("releases").len(), 1, "{beta}");
    let shown = cli.ok(&["releases", "show", &id2.to_string()]);
    assert_eq!(shown["version"], "1.1.0");
    assert_eq!(shown["mandatory"], true);
    assert!(shown.get("manifest").is_none(), "show leaves the raw envelope out");

    // Rollout control.
    let status = |id: i64| cli.ok(&["status", &id.to_string()]);
    assert_eq!(status(id2)["state"], "active");
    assert_eq!(status(id2)["percent"], 10.0);
    cli.ok(&["rollout", "pause", &id2.to_string(), "--reason", "looking into crash reports"]);
    let s = status(id2);
    assert_eq!(s["state"], "paused", "{s}");
    assert_eq!(s["reason"], "looking into crash reports", "{s}");
    let again = cli.fails(&["rollout", "pause", &id2.to_string()], 4);
    assert!(again.contains("only an active rollout can be paused"), "{again}");
    cli.ok(&["rollout", "resume", &id2.to_string()]);
    assert_eq!(status(id2)["state"], "active");
    cli.ok(&["rollout", "set", &id2.to_string(), "50"]);
    assert_eq!(status(id2)["percent"], 50.0);
    let staged = status(id1);
    cli.ok(&["rollout", "advance", &id1.to_string()]);
    let advanced = status(id1);
    assert!(
        advanced["stage"].as_i64() > staged["stage"].as_i64() || advanced["state"] == "completed",
        "advance moves to the next stage: {staged} → {advanced}"
    );

    // Rollback: v1's content again under a new version_code, without any upload.
    let rb = cli.ok(&["rollback", &id2.to_string(), "--key", &key]);
    assert_eq!(rb["halted"], id2, "{rb}");
    assert_eq!(rb["content_of"], id1, "{rb}");
    assert_eq!(rb["version_code"], 3, "{rb}");
    let id_rb = rb["id"].as_i64().expect("id");
    assert_eq!(status(id2)["state"], "halted");
    let rb_release = cli.ok(&["releases", "show", &id_rb.to_string()]);
    assert_eq!(rb_release["image_sha256"], r1["image_sha256"], "rollback republishes v1's bytes");
    assert!(rb_release["version"].as_str().expect("version").starts_with("1.0.0+rollback."), "{rb_release}");

    // Export v2 for an offline site and verify it against the trust root we own.
    let out = cli.path("export-v2");
    let out_s = out.to_str().expect("utf-8");
    let ex = cli.ok(&["export", &id2.to_string(), out_s]);
    assert_eq!(ex["version_code"], 2, "{ex}");
    let v = cli.ok(&["verify", out_s, "--trust-root", &root]);
    assert_verified(&v, &v2);
    // The same as one tar file (a USB stick, a sneakernet upload), verified as it is.
    let tar = cli.path("kiosk-1.1.0.tar");
    let tar_s = tar.to_str().expect("utf-8");
    let ex_tar = cli.ok(&["export", &id2.to_string(), tar_s]);
    assert_eq!(ex_tar["file"], tar_s, "{ex_tar}");
    let v = cli.ok(&["verify", tar_s, "--trust-root", &root]);
    assert_verified(&v, &v2);
    // Flip a byte inside one chunk object (found by its bytes, from the directory export).
    let mut bytes = std::fs::read(&tar).expect("read tar");
    let obj = std::fs::read(any_chunk(&out)).expect("read chunk");
    let at = bytes.windows(obj.len()).position(|w| w == obj.as_slice()).expect("chunk object inside the tar");
    bytes[at + obj.len() / 2] ^= 1;
    std::fs::write(&tar, bytes).expect("write");
    cli.fails(&["verify", tar_s, "--trust-root", &root], 7);

    // A local image against the exported manifest: v2 matches, v1 does not.
    let manifest = out.join("manifest.json");
    let m = manifest.to_str().expect("utf-8");
    cli.ok(&["verify", "--image", &img2, "--manifest", m, "--trust-root", &root]);
    let wrong = cli.fails(&["verify", "--image", &img1, "--manifest", m, "--trust-root", &root], 7);
    assert!(wrong.contains("sha256") || wrong.contains("SHA-256") || wrong.contains("differ"), "{wrong}");

    // Devices list works (empty: nobody enrolled).
    let devices = cli.ok(&["devices", "list", "--product", "kiosk"]);
    assert_eq!(devices["devices"].as_array().map(Vec::len), Some(0), "{devices}");
}

fn assert_verified(v: &Value, image: &[u8]) {
    use sha2::Digest as _;
    let sha = hex_lower(&sha2::Sha256::digest(image));
    assert_eq!(v["image_sha256"], sha, "verify reports the verified image: {v}");
}

fn any_chunk(export: &std::path::Path) -> std::path::PathBuf {
    let sub = std::fs::read_dir(export.join("chunks")).expect("chunks").next().expect("a chunk dir").expect("entry");
    std::fs::read_dir(sub.path()).expect("dir").next().expect("a chunk").expect("entry").path()
}

fn hex_lower(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// `login` stores URL and token 0600 and later commands use them without any environment.
#[test]
fn login_stores_credentials_privately() {
    let coord = Coordinator::start(Engine::Sqlite);
    let mut cli = Flotilla::new(&coord);
    let admin = cli.token.take().expect("admin");
    let no_login = cli.command().env_remove("FLOTILLA_URL").args(["--json", "product", "list"]).output().expect("run");
    assert_eq!(no_login.status.code(), Some(2), "no URL anywhere is a usage error");
    let out = cli
        .command()
        .env_remove("FLOTILLA_URL")
        .args(["--json", "login", "--to", &coord.url, "--with-token", &admin])
        .output()
        .expect("run");
    assert!(out.status.success(), "{out:?}");
    let cfg = cli.home.path().join("config/config.toml");
    assert_eq!(std::fs::metadata(&cfg).expect("config").permissions().mode() & 0o777, 0o600);
    let list = cli.command().env_remove("FLOTILLA_URL").args(["--json", "product", "list"]).output().expect("run");
    assert!(list.status.success(), "stored login is used: {list:?}");
}

/// Completions for the three shells name the subcommands.
#[test]
fn completions() {
    for shell in ["bash", "zsh", "fish"] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_flotilla"))
            .args(["completions", shell])
            .output()
            .expect("run");
        assert!(out.status.success());
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("rollback") && text.contains("export"), "{shell}: {text:.200}");
    }
}

both_engines!(trust_root_rotation, trust_root_rotation);

/// Key rotation: a new trust root (new release key) signed by the old root threshold is pushed
/// to the coordinator; releases signed by the retired key are refused, the new key publishes,
/// and devices can fetch the chain.
fn trust_root_rotation(engine: Engine) {
    let coord = Coordinator::start(engine);
    let cli = Flotilla::new(&coord);
    let (old_key, root) = cli.setup_product("fleet");
    let s = |p: std::path::PathBuf| p.to_str().expect("utf-8").to_owned();
    let (root_key, new_key, root2) =
        (s(cli.path("root.pem")), s(cli.path("release-2.pem")), s(cli.path("root-2.json")));
    cli.ok(&["keys", "generate", "--out", &new_key]);
    let rotated = cli.ok(&[
        "root",
        "rotate",
        "--current",
        &root,
        "--sign-with",
        &root_key,
        "--release-key",
        &new_key,
        "--out",
        &root2,
    ]);
    assert_eq!(rotated["version"], 2, "{rotated}");
    // Signed by a key the current root does not know: refused locally, nothing written.
    let stranger = s(cli.path("stranger.pem"));
    cli.ok(&["keys", "generate", "--out", &stranger]);
    let bad = s(cli.path("root-bad.json"));
    let msg = cli.fails(&["root", "rotate", "--current", &root, "--sign-with", &stranger, "--out", &bad], 2);
    assert!(msg.contains("threshold"), "{msg}");
    assert!(!std::path::Path::new(&bad).exists());

    let pushed = cli.ok(&["root", "push", "--product", "fleet", &root2]);
    assert_eq!((pushed["version"].as_u64(), pushed["previous_version"].as_u64()), (Some(2), Some(1)), "{pushed}");
    // The same root again is not version N+1 of the current one.
    let again = cli.fails(&["root", "push", "--product", "fleet", &root2], 6);
    assert!(again.contains("rotation refused"), "{again}");

    let img = write(&cli.path("os.img"), &image(31, 1 << 20));
    let msg =
        cli.fails(&["release", "--product", "fleet", "--image", &img, "--version", "1.0.0", "--key", &old_key], 6);
    assert!(msg.contains("not a release key") && msg.contains("version 2"), "{msg}");
    let r = cli.ok(&["release", "--product", "fleet", "--image", &img, "--version", "1.0.0", "--key", &new_key]);
    assert_eq!(r["version_code"], 1, "{r}");

    let chain = crate::support::http_json(
        "GET",
        &format!("{}/v1/products/fleet/trust-roots?after=1", coord.url),
        &coord.admin,
        None,
    );
    assert_eq!(chain["current_version"], 2, "{chain}");
    let roots = chain["trust_roots"].as_array().expect("roots");
    assert_eq!(roots.len(), 1, "{chain}");
    assert_eq!(roots[0]["trust_root"].as_str(), Some(std::fs::read_to_string(&root2).expect("root2").as_str()));
    // A device holding version 1 can verify the step with the keys it trusts.
    let v1 = flotilla_core::trust::TrustRoot::from_trusted_json(&std::fs::read(&root).expect("root")).expect("v1");
    let v2 = v1.rotate(roots[0]["trust_root"].as_str().expect("text").as_bytes()).expect("chain verifies");
    assert_eq!(v2.version(), 2);
}
