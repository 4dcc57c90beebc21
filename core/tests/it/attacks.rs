//! One fixture directory per attack under `tests/fixtures/attacks/`, one test each that
//! asserts the exact rejection. `valid` is the control: all checks pass on it, so a failing
//! attack test can't be explained by broken fixtures. Regenerate with
//! `cargo run -p flotilla-core --example gen_fixtures -- core/tests/fixtures`.

use std::fs;
use std::path::{Path, PathBuf};

use flotilla_core::chunking::ChunkParamsError;
use flotilla_core::ids::ChunkId;
use flotilla_core::index::IndexError;
use flotilla_core::json::JsonError;
use flotilla_core::manifest::{DeviceContext, ManifestError, verify_for_device};
use flotilla_core::object::{self, ObjectError};
use flotilla_core::rollout::{AssignmentError, verify_assignment};
use flotilla_core::time::{Timestamp, trusted_now};
use flotilla_core::trust::{Role, RootUpdateError, SignatureError, TrustRoot, TrustRootError};

#[derive(Debug)]
enum Rejected {
    Root(RootUpdateError),
    Manifest(ManifestError),
    Object(ObjectError),
    Assignment(AssignmentError),
}

#[derive(serde::Deserialize)]
struct Device {
    product: String,
    channel: String,
    hardware: Option<String>,
    installed_version_code: Option<u64>,
    security_floor: u32,
    clock: Timestamp,
    time_floor: Option<Timestamp>,
    device_id: String,
    nonce: String,
}

#[derive(serde::Deserialize)]
struct ChunkMeta {
    id: ChunkId,
    len: u32,
}

fn dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/attacks").join(name)
}

fn read(dir: &Path, file: &str) -> Vec<u8> {
    fs::read(dir.join(file)).unwrap_or_else(|e| panic!("{}/{file}: {e}", dir.display()))
}

/// Runs every check a device applies, in the order it applies them.
fn check(name: &str) -> Result<(), Rejected> {
    let d = dir(name);
    assert!(d.is_dir(), "fixture {name} is missing");
    let mut root = TrustRoot::from_trusted_json(&read(&d, "root.json")).map_err(Rejected::Root)?;
    if d.join("new_root.json").exists() {
        root = root.rotate(&read(&d, "new_root.json")).map_err(Rejected::Root)?;
    }
    let dev: Device = serde_json::from_slice(&read(&d, "device.json")).expect("device.json");
    let mut ctx = DeviceContext::new(dev.product, dev.channel, trusted_now(dev.clock, dev.time_floor, None));
    ctx.hardware = dev.hardware;
    ctx.installed_version_code = dev.installed_version_code;
    ctx.security_floor = dev.security_floor;

    let manifest = verify_for_device(&read(&d, "manifest.json"), &root, &ctx).map_err(Rejected::Manifest)?;
    let index = manifest.check_index(&read(&d, "index.bin")).map_err(Rejected::Manifest)?;

    let meta: ChunkMeta = serde_json::from_slice(&read(&d, "chunk.json")).expect("chunk.json");
    assert_eq!(index.entries()[0].id, meta.id, "chunk.json names the index's first chunk");
    object::decode(&read(&d, "chunk.obj"), &meta.id, meta.len).map_err(Rejected::Object)?;

    let assignment = verify_assignment(&read(&d, "assignment.json"), &root, &dev.device_id, &dev.nonce, ctx.now)
        .map_err(Rejected::Assignment)?;
    assignment.check_agreement(&manifest).map_err(Rejected::Assignment)?;
    Ok(())
}

macro_rules! attack {
    ($test:ident, $dir:literal, $pat:pat) => {
        #[test]
        fn $test() {
            let err = check($dir).expect_err(concat!("fixture ", $dir, " was accepted"));
            assert!(matches!(err, $pat), "fixture {}: wrong rejection {err:?}", $dir);
        }
    };
}

#[test]
fn valid_fixture_passes_every_check() {
    check("valid").expect("the control fixture must pass");
}

attack!(
    forged_signature_is_rejected,
    "forged-signature",
    Rejected::Manifest(ManifestError::Signature(SignatureError::BadSignature { .. }))
);
attack!(
    unknown_key_is_rejected,
    "unknown-key",
    Rejected::Manifest(ManifestError::Signature(SignatureError::UnknownKey { .. }))
);
attack!(
    below_threshold_is_rejected,
    "below-threshold",
    Rejected::Manifest(ManifestError::Signature(SignatureError::BelowThreshold {
        role: Role::Release,
        valid: 1,
        threshold: 2
    }))
);
attack!(
    duplicate_signature_same_key_is_rejected,
    "duplicate-signature-same-key",
    Rejected::Manifest(ManifestError::Signature(SignatureError::DuplicateSignature { .. }))
);
attack!(
    signed_by_rollout_key_is_rejected,
    "signed-by-rollout-key",
    Rejected::Manifest(ManifestError::Signature(SignatureError::KeyNotInRole { role: Role::Release, .. }))
);
attack!(unsigned_is_rejected, "unsigned", Rejected::Manifest(ManifestError::Signature(SignatureError::Unsigned)));
attack!(
    signature_wrong_algorithm_is_rejected,
    "signature-wrong-algorithm",
    Rejected::Manifest(ManifestError::Signature(SignatureError::AlgorithmMismatch { len: 512, .. }))
);
attack!(
    root_key_wrong_algorithm_is_rejected,
    "root-key-wrong-algorithm",
    Rejected::Root(RootUpdateError::Invalid(TrustRootError::KeyAlgorithmMismatch { .. }))
);
attack!(
    root_duplicate_key_is_rejected,
    "root-duplicate-key",
    Rejected::Root(RootUpdateError::Invalid(TrustRootError::DuplicateKey { .. }))
);
attack!(
    root_threshold_zero_is_rejected,
    "root-threshold-zero",
    Rejected::Root(RootUpdateError::Invalid(TrustRootError::InvalidThreshold {
        role: Role::Release,
        threshold: 0,
        ..
    }))
);
attack!(
    wrong_payload_type_is_rejected,
    "wrong-payload-type",
    Rejected::Manifest(ManifestError::Signature(SignatureError::WrongPayloadType { .. }))
);
attack!(
    duplicate_json_key_is_rejected,
    "duplicate-json-key",
    Rejected::Manifest(ManifestError::Payload(JsonError::DuplicateKey { .. }))
);
attack!(expired_is_rejected, "expired", Rejected::Manifest(ManifestError::Expired { .. }));
attack!(
    expired_despite_clock_reset_is_rejected,
    "expired-despite-clock-reset",
    Rejected::Manifest(ManifestError::Expired { .. })
);
attack!(
    replayed_version_code_is_rejected,
    "replayed-version-code",
    Rejected::Manifest(ManifestError::NotNewer { installed: 42, offered: 42 })
);
attack!(
    rollback_version_code_is_rejected,
    "rollback-version-code",
    Rejected::Manifest(ManifestError::NotNewer { installed: 41, offered: 40 })
);
attack!(wrong_product_is_rejected, "wrong-product", Rejected::Manifest(ManifestError::WrongProduct { .. }));
attack!(wrong_channel_is_rejected, "wrong-channel", Rejected::Manifest(ManifestError::WrongChannel { .. }));
attack!(wrong_hardware_is_rejected, "wrong-hardware", Rejected::Manifest(ManifestError::WrongHardware { .. }));
attack!(
    security_version_below_floor_is_rejected,
    "security-version-below-floor",
    Rejected::Manifest(ManifestError::SecurityVersionTooLow { floor: 4, offered: 3 })
);
attack!(
    root_rotation_without_old_threshold_is_rejected,
    "root-rotation-without-old-threshold",
    Rejected::Root(RootUpdateError::NotSignedByCurrent(SignatureError::BelowThreshold {
        role: Role::Root,
        valid: 1,
        threshold: 2
    }))
);
attack!(
    root_rotation_skips_version_is_rejected,
    "root-rotation-skips-version",
    Rejected::Root(RootUpdateError::VersionNotNext { expected: 2, got: 3 })
);
attack!(
    index_hash_mismatch_is_rejected,
    "index-hash-mismatch",
    Rejected::Manifest(ManifestError::IndexMismatch { .. })
);
attack!(index_truncated_is_rejected, "index-truncated", Rejected::Manifest(ManifestError::IndexSizeMismatch { .. }));
/// The bomb's frame declares a window far larger than the chunk and inflates far past it. The
/// decoder works in one shot into a buffer of the chunk's length plus one byte, so it allocates
/// no window and stops where the output passes the chunk's length.
#[test]
fn chunk_zip_bomb_is_rejected() {
    let err = check("chunk-zip-bomb").expect_err("fixture chunk-zip-bomb was accepted");
    assert!(
        matches!(&err, Rejected::Object(ObjectError::DecompressesPastLength { limit }) if *limit == 20_022),
        "fixture chunk-zip-bomb: wrong rejection {err:?}"
    );
}
attack!(chunk_hash_swapped_is_rejected, "chunk-hash-swapped", Rejected::Object(ObjectError::IdMismatch { .. }));
attack!(
    assignment_hash_mismatch_is_rejected,
    "assignment-hash-mismatch",
    Rejected::Assignment(AssignmentError::Mismatch { field: "image_sha256" })
);
attack!(
    assignment_replayed_nonce_is_rejected,
    "assignment-replayed-nonce",
    Rejected::Assignment(AssignmentError::NonceMismatch)
);
attack!(
    assignment_signed_by_publisher_is_rejected,
    "assignment-signed-by-publisher",
    Rejected::Assignment(AssignmentError::Signature(SignatureError::KeyNotInRole { role: Role::Rollout, .. }))
);

/// Every fixture directory has a test above (a new fixture without a test fails here).
#[test]
fn every_fixture_has_a_test() {
    let src = include_str!("attacks.rs");
    let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/attacks");
    let mut missing = Vec::new();
    for entry in fs::read_dir(&base).expect("fixtures dir") {
        let name = entry.expect("entry").file_name().into_string().expect("utf-8");
        if !src.contains(&format!("\"{name}\"")) {
            missing.push(name);
        }
    }
    assert!(missing.is_empty(), "fixtures without a test: {missing:?}");
}

/// A manifest whose chunking parameters are out of range is refused as invalid, not parsed
/// into something a chunker would panic on.
#[test]
fn index_with_invalid_params_is_an_error_not_a_panic() {
    let mut bytes = read(&dir("valid"), "index.bin");
    bytes[16..20].copy_from_slice(&3000u32.to_le_bytes()); // avg not a power of two
    assert!(matches!(
        flotilla_core::index::ChunkIndex::decode(&bytes),
        Err(IndexError::Params(ChunkParamsError { avg: 3000, .. }))
    ));
}
