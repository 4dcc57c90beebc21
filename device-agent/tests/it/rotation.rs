//! Trust-root rotation on the device: the publisher rotates its release key (`flotilla root
//! rotate`, `root push`); an agent provisioned with the old root fetches the chain from the
//! coordinator, verifies each step, keeps the new root and installs a release signed only by
//! the new key. A forged root in the chain (a compromised coordinator's database) is refused.

use std::path::Path;
use std::process::Command;

use flotilla_core::keys::{Algorithm, SigningKey};
use flotilla_core::time::Timestamp;
use flotilla_core::trust::RootDocument;

use crate::support::*;

/// Runs SQL on the coordinator's SQLite database with the `sqlite3` tool (scripts/test.sh
/// installs it): this test plays an attacker who controls the coordinator's storage.
fn sql(coord: &Coordinator, statement: &str) {
    let db = coord.data.path().join("flotilla.db");
    assert!(db.exists(), "{} is missing", db.display());
    let out = Command::new("sqlite3")
        .arg(&db)
        .arg(statement)
        .output()
        .expect("run sqlite3 (scripts/test.sh installs it; this test does not skip without it)");
    assert!(out.status.success(), "sqlite3 failed: {}", String::from_utf8_lossy(&out.stderr));
}

/// A root of `version` over fresh keys, signed only by them: not chained to anything.
fn forged_root(version: u64) -> String {
    let k = || SigningKey::generate(Algorithm::Ed25519).expect("key");
    let (root, release, rollout) = (k(), k(), k());
    let doc = RootDocument::new(
        version,
        Timestamp::now().saturating_add(std::time::Duration::from_secs(86_400)),
        (&[root.public_key()], 1),
        (&[release.public_key()], 1),
        (&[rollout.public_key()], 1),
    );
    String::from_utf8(doc.sign(&[&root]).expect("sign").to_json()).expect("utf-8")
}

fn release_with_key(publisher: &Publisher, version: &str, image: &Path, key: &Path) {
    run_ok(
        publisher
            .cli(&publisher.api_key)
            .args(["release", "--product", PRODUCT, "--version", version, "--image"])
            .arg(image)
            .arg("--key")
            .arg(key)
            .args(["--rollout", "100"]),
    );
}

#[test]
fn agent_follows_a_rotated_trust_root_and_refuses_a_forged_one() {
    let coord = Coordinator::start();
    let publisher = Publisher::new(&coord);
    let dev = Device::new(&coord, &publisher.path("root.json"), SlotKind::File, &DeviceOptions::default());
    let v1 = image(61, 1 << 20);
    std::fs::write(publisher.path("v1.img"), &v1).unwrap();
    publisher.release("1.0.0", &publisher.path("v1.img"), &[]);
    assert_eq!(dev.check_once()["outcome"], "staged");
    assert_eq!(dev.boot_check().1["outcome"], "committed");
    assert_eq!(dev.status()["trust_root_version"], 1);

    // The publisher retires its release key: root version 2, signed by the root key.
    let new_key = publisher.path("release-2.pem");
    run_ok(publisher.cli(ADMIN).args(["keys", "generate", "--out"]).arg(&new_key));
    run_ok(
        publisher
            .cli(ADMIN)
            .args(["root", "rotate", "--current"])
            .arg(publisher.path("root.json"))
            .arg("--sign-with")
            .arg(publisher.path("root.pem"))
            .arg("--release-key")
            .arg(&new_key)
            .arg("--out")
            .arg(publisher.path("root-2.json")),
    );
    run_ok(publisher.cli(ADMIN).args(["root", "push", "--product", PRODUCT]).arg(publisher.path("root-2.json")));
    // ... and someone with the coordinator's database appends a root of their own.
    let forged = forged_root(3).replace('\'', "''");
    sql(
        &coord,
        &format!(
            "INSERT INTO trust_roots (product, version, envelope, created_at) VALUES ('{PRODUCT}', 3, '{forged}', 0)"
        ),
    );

    let v2 = edited(&v1, 4, 3);
    std::fs::write(publisher.path("v2.img"), &v2).unwrap();
    release_with_key(&publisher, "1.1.0", &publisher.path("v2.img"), &new_key);

    // Version 2 follows from version 1 and is kept; version 3 is refused, and so is the
    // install while the chain carries it.
    let out = dev.run(&["check-once"]);
    assert!(!out.status.success(), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("trust root version 3 refused") && err.contains("keeps trusting version 2"), "{err}");
    let st = dev.status();
    assert_eq!(st["trust_root_version"], 2, "{st}");
    assert_eq!(st["installed"]["version"], "1.0.0");
    assert!(dev.path("state/trust-roots/2.root.json").exists());
    assert!(!dev.path("state/trust-roots/3.root.json").exists());
    assert_eq!(dev.slot_image("a").len(), 0, "nothing was written to the inactive slot");

    // Without the forged root the chain is clean: the release signed only by the new key
    // installs on the device that was provisioned with the old root.
    sql(&coord, &format!("DELETE FROM trust_roots WHERE product = '{PRODUCT}' AND version = 3"));
    let report = dev.check_once();
    assert_eq!(report["outcome"], "staged", "{report}");
    assert_eq!(dev.slot_image("a"), v2);
    assert_eq!(dev.boot_check().1["outcome"], "committed");
    let st = dev.status();
    assert_eq!((st["installed"]["version"].as_str(), st["trust_root_version"].as_u64()), (Some("1.1.0"), Some(2)));
    // The provisioned file is untouched: the rotation lives in the state directory.
    assert_eq!(
        std::fs::read(dev.path("trust-root.json")).unwrap(),
        std::fs::read(publisher.path("root.json")).unwrap()
    );
}
