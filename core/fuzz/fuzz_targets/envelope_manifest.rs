//! DSSE envelopes, signature checks against a fixed trust root, and the manifest parser.
//!
//! The trust root is the `valid` attack fixture's (root threshold 2, release threshold 1),
//! the device is the fixture's device, so the fixtures' manifests are accepted and their
//! mutations exercise every layer. The first input byte picks what the rest is:
//! - 0: an envelope as received from the network, checked as a device would;
//! - 1: a manifest payload, signed here with a release key, so the strict JSON parser, field
//!   validation and device policy see arbitrary payloads behind a valid signature;
//! - 2: a trust-root payload, signed here with both root keys, offered as a rotation;
//! - 3: a trust-root envelope as received, offered as a rotation and as a provisioned root.
#![no_main]

use std::sync::LazyLock;

use flotilla_core::dsse::Envelope;
use flotilla_core::ids::Sha256Digest;
use flotilla_core::json;
use flotilla_core::keys::SigningKey;
use flotilla_core::manifest::{self, DeviceContext, MANIFEST_PAYLOAD_TYPE, MAX_MANIFEST_LEN, Manifest};
use flotilla_core::trust::{ROOT_PAYLOAD_TYPE, Role, TrustRoot};
use libfuzzer_sys::fuzz_target;

static ROOT: LazyLock<TrustRoot> = LazyLock::new(|| {
    match TrustRoot::from_trusted_json(include_bytes!("../../tests/fixtures/attacks/valid/root.json")) {
        Ok(root) => root,
        Err(e) => panic!("the valid fixture's trust root does not load: {e}"),
    }
});

/// The fixture's keys come from fixed seeds (see core/examples/gen_fixtures.rs).
static RELEASE_KEY: LazyLock<SigningKey> = LazyLock::new(|| SigningKey::from_ed25519_seed(&[11; 32]));
static ROOT_KEYS: LazyLock<[SigningKey; 2]> =
    LazyLock::new(|| [SigningKey::from_ed25519_seed(&[1; 32]), SigningKey::from_ed25519_seed(&[2; 32])]);

/// The fixture's device.json.
static DEVICE: LazyLock<DeviceContext> = LazyLock::new(|| {
    let now = match "2026-06-01T00:00:00Z".parse() {
        Ok(t) => t,
        Err(e) => panic!("{e}"),
    };
    let mut device = DeviceContext::new("dev-board", "stable", now);
    device.hardware = Some("rpi4".into());
    device.installed_version_code = Some(41);
    device.security_floor = 2;
    device
});

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    match mode % 4 {
        0 => received_manifest(rest),
        1 => signed_payload(rest),
        2 => signed_root(rest),
        _ => received_root(rest),
    }
});

fn received_manifest(bytes: &[u8]) {
    let verdict = manifest::verify_for_device(bytes, &ROOT, &DEVICE);
    let Ok(env) = Envelope::from_json(bytes) else {
        assert!(verdict.is_err(), "an envelope that does not parse was accepted");
        return;
    };
    // What parses re-encodes to an envelope that parses to the same thing.
    assert_eq!(Envelope::from_json(&env.to_json()).ok().as_ref(), Some(&env));
    let signed = ROOT.verify(&env, Role::Release, MANIFEST_PAYLOAD_TYPE);
    if let Ok(verified) = verdict {
        assert!(signed.is_ok(), "accepted without a release threshold of signatures");
        accepted(verified, &env.payload);
    }
}

fn signed_payload(payload: &[u8]) {
    let env = match Envelope::sign(MANIFEST_PAYLOAD_TYPE, payload.to_vec(), &[&*RELEASE_KEY]) {
        Ok(env) => env,
        Err(e) => panic!("Ed25519 signing failed: {e}"),
    };
    if let Ok(verified) = manifest::verify_for_device(&env.to_json(), &ROOT, &DEVICE) {
        accepted(verified, payload);
    }
}

/// Checks that hold for every manifest a device accepts.
fn accepted(verified: manifest::VerifiedManifest, payload: &[u8]) {
    let m = verified.manifest();
    assert_eq!(verified.payload_sha256(), Sha256Digest::of(payload));
    assert!(json::check(payload, MAX_MANIFEST_LEN).is_ok(), "accepted a payload the strict parser refuses");
    assert!(m.validate().is_ok());
    assert_eq!((m.product.as_str(), m.channel.as_str()), ("dev-board", "stable"));
    assert!(m.version_code > 41, "accepted a version_code that is not newer");
    assert!(m.security_version >= 2);
    assert!(m.expires_at > DEVICE.now);
    assert!(m.compatibility.hardware.is_empty() || m.compatibility.hardware.iter().any(|h| h == "rpi4"));
    // The publisher's serialisation of an accepted manifest reads back as the same manifest.
    match json::from_slice::<Manifest>(&m.to_json(), MAX_MANIFEST_LEN) {
        Ok(again) => assert_eq!(&again, m),
        Err(e) => panic!("an accepted manifest does not survive re-serialisation: {e}"),
    }
}

fn signed_root(payload: &[u8]) {
    let [k1, k2] = &*ROOT_KEYS;
    let env = match Envelope::sign(ROOT_PAYLOAD_TYPE, payload.to_vec(), &[k1, k2]) {
        Ok(env) => env,
        Err(e) => panic!("Ed25519 signing failed: {e}"),
    };
    if let Ok(next) = ROOT.rotate(&env.to_json()) {
        assert_eq!(next.version(), ROOT.version() + 1, "rotation skipped a version");
    }
}

fn received_root(bytes: &[u8]) {
    if let Ok(next) = ROOT.rotate(bytes) {
        assert_eq!(next.version(), ROOT.version() + 1, "rotation skipped a version");
    }
    let _ = TrustRoot::from_trusted_json(bytes);
}
