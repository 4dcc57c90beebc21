//! Regenerates the adversarial fixtures under `core/tests/fixtures/attacks/`, one directory
//! per attack. Run: `cargo run -p flotilla-core --example gen_fixtures -- core/tests/fixtures`.
//!
//! Every fixture starts from the `valid` set (a trust root, a signed manifest, its index, a
//! chunk object, a signed rollout assignment and the device's context) and changes exactly
//! one thing. Keys come from fixed seeds (Ed25519) or the committed test RSA key, so the
//! output is reproducible except for RSA-PSS signatures, which are randomised.

use std::fs;
use std::path::{Path, PathBuf};

use flotilla_core::chunking::{ChunkParams, Chunker};
use flotilla_core::dsse::{Envelope, Signature};
use flotilla_core::keys::{Algorithm, SigningKey};
use flotilla_core::manifest::{Compatibility, IndexRef, MANIFEST_PAYLOAD_TYPE, Manifest, Payload, PayloadKind};
use flotilla_core::rollout::{AssignedRelease, Assignment};
use flotilla_core::trust::{KeyEntry, RootDocument};
use flotilla_core::{index, object};

type Res<T = ()> = Result<T, Box<dyn std::error::Error>>;

fn key(seed: u8) -> SigningKey {
    SigningKey::from_ed25519_seed(&[seed; 32])
}

fn ts(s: &str) -> flotilla_core::time::Timestamp {
    s.parse().unwrap_or_else(|e| panic!("{e}"))
}

struct Keys {
    root1: SigningKey,
    root2: SigningKey,
    release1: SigningKey,
    release2: SigningKey,
    rsa: SigningKey,
    rollout: SigningKey,
    stranger: SigningKey,
    new_root: SigningKey,
}

#[derive(Clone)]
struct Set {
    files: Vec<(&'static str, Vec<u8>)>,
}

impl Set {
    fn with(&self, name: &'static str, bytes: Vec<u8>) -> Self {
        let mut s = self.clone();
        s.files.retain(|(n, _)| *n != name);
        s.files.push((name, bytes));
        s
    }

    fn write(&self, dir: &Path, what: &str) -> Res {
        fs::create_dir_all(dir)?;
        for (name, bytes) in &self.files {
            fs::write(dir.join(name), bytes)?;
        }
        fs::write(dir.join("ATTACK.md"), format!("{what}\n"))?;
        Ok(())
    }
}

fn root_doc(k: &Keys, release_threshold: u32) -> RootDocument {
    RootDocument::new(
        1,
        ts("2030-01-01T00:00:00Z"),
        (&[k.root1.public_key(), k.root2.public_key()], 2),
        (&[k.release1.public_key(), k.release2.public_key(), k.rsa.public_key()], release_threshold),
        (&[k.rollout.public_key()], 1),
    )
}

fn sample_image() -> Vec<u8> {
    let mut x = 0x2545_f491_4f6c_dd1du64;
    (0..300_000u32)
        .map(|i| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            if (i / 4096) % 3 == 0 { b"flotilla "[(i % 9) as usize] } else { (x >> 32) as u8 }
        })
        .collect()
}

fn main() -> Res {
    let out: PathBuf = std::env::args().nth(1).unwrap_or_else(|| "core/tests/fixtures".into()).into();
    let rsa_pem_path = out.join("keys/rsa4096-test-only.pem");
    let rsa = if rsa_pem_path.exists() {
        SigningKey::from_pkcs8_pem(&fs::read_to_string(&rsa_pem_path)?)?
    } else {
        let k = SigningKey::generate(Algorithm::RsaPssSha256)?;
        fs::create_dir_all(rsa_pem_path.parent().ok_or("no parent")?)?;
        fs::write(&rsa_pem_path, k.to_pkcs8_pem()?.as_bytes())?;
        k
    };
    let k = Keys {
        root1: key(1),
        root2: key(2),
        release1: key(11),
        release2: key(12),
        rsa,
        rollout: key(21),
        stranger: key(99),
        new_root: key(31),
    };

    let image = sample_image();
    let chunked = Chunker::new(ChunkParams::BUNDLE).chunk_reader(&image[..])?;
    let index_bytes = chunked.index.encode();
    let first = chunked.index.entries()[0];
    let chunk_obj = object::encode(&image[..first.len as usize], object::DEFAULT_LEVEL);
    let chunk_meta = serde_json::to_vec_pretty(&serde_json::json!({ "id": first.id, "len": first.len }))?;

    let manifest = Manifest {
        schema_version: 1,
        product: "dev-board".into(),
        channel: "stable".into(),
        version: "2.1.0".parse()?,
        version_code: 42,
        security_version: 3,
        payload: Payload {
            kind: PayloadKind::Raw,
            size: image.len() as u64,
            sha256: chunked.sha256,
            blake3: chunked.blake3,
        },
        chunking: ChunkParams::BUNDLE,
        index: IndexRef { id: chunked.index.id(), size: index_bytes.len() as u64 },
        deltas: Vec::new(),
        compatibility: Compatibility { hardware: vec!["rpi4".into(), "rpi5".into()], ..Default::default() },
        mandatory: false,
        created_at: ts("2026-05-01T00:00:00Z"),
        expires_at: ts("2027-05-01T00:00:00Z"),
        notes: None,
    };
    let sign_manifest = |m: &Manifest, keys: &[&SigningKey]| -> Res<Vec<u8>> { Ok(m.sign(keys)?.to_json()) };
    let manifest_env = manifest.sign(&[&k.release1])?;
    let payload_sha = flotilla_core::ids::Sha256Digest::of(&manifest_env.payload);

    let assignment = Assignment {
        schema_version: 1,
        device_id: "dev-0001".into(),
        nonce: "6e6f6e63652d6f6e65".into(),
        server_time: ts("2026-06-01T00:00:00Z"),
        expires_at: ts("2026-06-02T00:00:00Z"),
        product: "dev-board".into(),
        channel: "stable".into(),
        release: Some(AssignedRelease {
            version: manifest.version.clone(),
            version_code: manifest.version_code,
            manifest_sha256: payload_sha,
            image_size: manifest.payload.size,
            image_sha256: manifest.payload.sha256,
            index_id: manifest.index.id,
        }),
        mandatory: false,
    };
    let device = serde_json::json!({
        "product": "dev-board",
        "channel": "stable",
        "hardware": "rpi4",
        "installed_version_code": 41,
        "security_floor": 2,
        "clock": "2026-06-01T00:00:00Z",
        "time_floor": null,
        "device_id": "dev-0001",
        "nonce": "6e6f6e63652d6f6e65",
    });

    let root = root_doc(&k, 1);
    let valid = Set {
        files: vec![
            ("root.json", root.sign(&[&k.root1, &k.root2])?.to_json()),
            ("manifest.json", manifest_env.to_json()),
            ("index.bin", index_bytes.clone()),
            ("chunk.obj", chunk_obj.clone()),
            ("chunk.json", chunk_meta),
            ("assignment.json", assignment.sign(&[&k.rollout])?.to_json()),
            ("device.json", serde_json::to_vec_pretty(&device)?),
        ],
    };
    let attacks = out.join("attacks");
    let _ = fs::remove_dir_all(&attacks);
    valid.write(
        &attacks.join("valid"),
        "Control: every check passes. If this fails, the fixtures are broken, not the attacks caught.",
    )?;

    let write = |name: &str, set: Set, what: &str| set.write(&attacks.join(name), what);

    // Signatures.
    let mut forged = manifest_env.clone();
    forged.payload =
        String::from_utf8(forged.payload)?.replace("\"version_code\": 42", "\"version_code\": 43").into_bytes();
    write(
        "forged-signature",
        valid.with("manifest.json", forged.to_json()),
        "The payload was edited after signing (version_code 42 -> 43); the release key's signature no longer verifies.",
    )?;

    write(
        "unknown-key",
        valid.with("manifest.json", sign_manifest(&manifest, &[&k.stranger])?),
        "Signed by a key the trust root does not list.",
    )?;

    let strict_root = root_doc(&k, 2).sign(&[&k.root1, &k.root2])?.to_json();
    write(
        "below-threshold",
        valid.with("root.json", strict_root.clone()).with("manifest.json", manifest_env.to_json()),
        "The trust root needs two release signatures; the manifest has one valid one.",
    )?;

    let mut twice = manifest.sign(&[&k.release1])?;
    let again = twice.signatures[0].clone();
    twice.signatures.push(again);
    write(
        "duplicate-signature-same-key",
        valid.with("root.json", strict_root).with("manifest.json", twice.to_json()),
        "Threshold two, met by copying one key's signature twice.",
    )?;

    write(
        "signed-by-rollout-key",
        valid.with("manifest.json", sign_manifest(&manifest, &[&k.rollout])?),
        "A release signed by the coordinator's rollout key, which may only sign rollouts.",
    )?;

    let mut unsigned = manifest_env.clone();
    unsigned.signatures.clear();
    write("unsigned", valid.with("manifest.json", unsigned.to_json()), "All signatures stripped.")?;

    let mut wrong_alg = manifest_env.clone();
    wrong_alg.signatures =
        vec![Signature { keyid: k.release1.public_key().key_id(), sig: k.rsa.sign(&wrong_alg.signed_bytes())? }];
    write(
        "signature-wrong-algorithm",
        valid.with("manifest.json", wrong_alg.to_json()),
        "An RSA-PSS signature presented under an Ed25519 key's id; the trust root pins each key's algorithm.",
    )?;

    let mut bad_root = root_doc(&k, 1);
    let ed = k.release2.public_key();
    bad_root.keys.retain(|e| e.keyid != ed.key_id());
    bad_root.keys.push(KeyEntry { algorithm: Algorithm::RsaPssSha256, ..KeyEntry::for_key(ed) });
    write(
        "root-key-wrong-algorithm",
        valid.with("root.json", bad_root.sign(&[&k.root1, &k.root2])?.to_json()),
        "The trust root lists an Ed25519 key as rsa-pss-sha256.",
    )?;

    let mut dup_root = root_doc(&k, 1);
    let first_key = dup_root.keys[0].clone();
    dup_root.keys.push(first_key);
    write(
        "root-duplicate-key",
        valid.with("root.json", dup_root.sign(&[&k.root1, &k.root2])?.to_json()),
        "The trust root lists the same key twice, so one key could count twice.",
    )?;

    let mut zero = root_doc(&k, 1);
    zero.roles.release.threshold = 0;
    write(
        "root-threshold-zero",
        valid.with("root.json", zero.sign(&[&k.root1, &k.root2])?.to_json()),
        "A role with threshold 0 would accept unsigned documents.",
    )?;

    let as_manifest = Envelope::sign("application/vnd.flotilla.root+json", manifest.to_json(), &[&k.release1])?;
    write(
        "wrong-payload-type",
        valid.with("manifest.json", as_manifest.to_json()),
        "A manifest payload signed under another payload type (type confusion).",
    )?;

    let dup_json = String::from_utf8(manifest.to_json())?.replacen(
        "\"version_code\": 42,",
        "\"version_code\": 42,\n  \"version_code\": 999,",
        1,
    );
    let dup_env = Envelope::sign(MANIFEST_PAYLOAD_TYPE, dup_json.into_bytes(), &[&k.release1])?;
    write(
        "duplicate-json-key",
        valid.with("manifest.json", dup_env.to_json()),
        "A validly signed payload with version_code twice (42 and 999); readers could disagree on which counts.",
    )?;

    // Manifest policy.
    let expired = Manifest { expires_at: ts("2026-05-15T00:00:00Z"), ..manifest.clone() };
    write(
        "expired",
        valid.with("manifest.json", sign_manifest(&expired, &[&k.release1])?),
        "The manifest expired before the device's trusted time.",
    )?;

    let mut clock_reset = device.clone();
    clock_reset["clock"] = "1970-01-01T00:00:00Z".into();
    clock_reset["time_floor"] = "2027-06-01T00:00:00Z".into();
    write(
        "expired-despite-clock-reset",
        valid.with("device.json", serde_json::to_vec_pretty(&clock_reset)?),
        "The device clock was reset to 1970, but its persisted time floor is past the manifest's expiry.",
    )?;

    let mut replay = device.clone();
    replay["installed_version_code"] = 42.into();
    write(
        "replayed-version-code",
        valid.with("device.json", serde_json::to_vec_pretty(&replay)?),
        "The device already runs version_code 42; the same manifest is replayed.",
    )?;

    let old = Manifest { version_code: 40, version: "2.0.0".parse()?, ..manifest.clone() };
    write(
        "rollback-version-code",
        valid.with("manifest.json", sign_manifest(&old, &[&k.release1])?),
        "A validly signed older release (version_code 40 < installed 41).",
    )?;

    let other_product = Manifest { product: "other-board".into(), ..manifest.clone() };
    write(
        "wrong-product",
        valid.with("manifest.json", sign_manifest(&other_product, &[&k.release1])?),
        "A validly signed manifest for another product.",
    )?;

    let other_channel = Manifest { channel: "beta".into(), ..manifest.clone() };
    write(
        "wrong-channel",
        valid.with("manifest.json", sign_manifest(&other_channel, &[&k.release1])?),
        "A validly signed manifest for another channel.",
    )?;

    let mut hw = device.clone();
    hw["hardware"] = "imx8".into();
    write(
        "wrong-hardware",
        valid.with("device.json", serde_json::to_vec_pretty(&hw)?),
        "The manifest lists rpi4 and rpi5; the device is an imx8.",
    )?;

    let mut floor = device.clone();
    floor["security_floor"] = 4.into();
    write(
        "security-version-below-floor",
        valid.with("device.json", serde_json::to_vec_pretty(&floor)?),
        "The device committed security_version 4; this release has 3.",
    )?;

    // Trust-root rotation.
    let next = RootDocument::new(
        2,
        ts("2031-01-01T00:00:00Z"),
        (&[k.root1.public_key(), k.new_root.public_key()], 2),
        (&[k.release1.public_key()], 1),
        (&[k.rollout.public_key()], 1),
    );
    write(
        "root-rotation-without-old-threshold",
        valid.with("new_root.json", next.sign(&[&k.root1, &k.new_root])?.to_json()),
        "Root v2 is signed by one old root key and one new key; the old root needs two of its own.",
    )?;
    let skip = RootDocument { version: 3, ..next.clone() };
    write(
        "root-rotation-skips-version",
        valid.with("new_root.json", skip.sign(&[&k.root1, &k.root2, &k.new_root])?.to_json()),
        "Root v3 offered to a device on v1: roots must be walked one version at a time.",
    )?;

    // Index and chunks.
    let mut other_index = index_bytes.clone();
    let last = other_index.len() - 5;
    other_index[last] ^= 0x01;
    write(
        "index-hash-mismatch",
        valid.with("index.bin", other_index),
        "An index with one id byte changed: its BLAKE3 no longer matches the manifest.",
    )?;
    write(
        "index-truncated",
        valid.with("index.bin", index_bytes[..index_bytes.len() - 36].to_vec()),
        "The index lost its last record.",
    )?;

    let bomb_len = first.len as usize * 64;
    let mut bomb = vec![object::FLAG_ZSTD];
    bomb.extend(zstd_like_bomb(bomb_len));
    write(
        "chunk-zip-bomb",
        valid.with("chunk.obj", bomb),
        "A zstd object that inflates to 64x the chunk length the index gives.",
    )?;

    let mut swapped = chunk_obj.clone();
    let wrong = object::encode(&image[first.len as usize..2 * first.len as usize], object::DEFAULT_LEVEL);
    swapped.clear();
    swapped.extend(wrong);
    write(
        "chunk-hash-swapped",
        valid.with("chunk.obj", swapped),
        "Another chunk's bytes served under this chunk's id.",
    )?;

    // Rollout assignment.
    let mut bad_assignment = assignment.clone();
    if let Some(r) = bad_assignment.release.as_mut() {
        r.image_sha256 = flotilla_core::ids::Sha256Digest::of(b"some other image");
    }
    write(
        "assignment-hash-mismatch",
        valid.with("assignment.json", bad_assignment.sign(&[&k.rollout])?.to_json()),
        "The coordinator's signed assignment names another image SHA-256 than the publisher's manifest.",
    )?;
    let replayed = Assignment { nonce: "6f6c642d6e6f6e6365".into(), ..assignment.clone() };
    write(
        "assignment-replayed-nonce",
        valid.with("assignment.json", replayed.sign(&[&k.rollout])?.to_json()),
        "A check response recorded earlier, with another check's nonce.",
    )?;
    write(
        "assignment-signed-by-publisher",
        valid.with("assignment.json", assignment.sign(&[&k.release1])?.to_json()),
        "A check response signed by a release key instead of the coordinator's rollout key.",
    )?;

    let _ = index::FORMAT_VERSION;
    println!("fixtures written to {}", attacks.display());
    Ok(())
}

/// A small zstd frame that decompresses to `len` zero bytes.
fn zstd_like_bomb(len: usize) -> Vec<u8> {
    zstd::bulk::compress(&vec![0u8; len], 19).unwrap_or_default()
}
