//! Keys, signatures and trust-root rotation, beyond the fixture attacks.

use std::path::Path;

use flotilla_core::dsse::Envelope;
use flotilla_core::keys::{Algorithm, KeyError, PublicKey, SigningKey};
use flotilla_core::time::Timestamp;
use flotilla_core::trust::{Role, RootDocument, RootUpdateError, SignatureError, TrustRoot};

fn ed(seed: u8) -> SigningKey {
    SigningKey::from_ed25519_seed(&[seed; 32])
}

fn rsa_test_key() -> SigningKey {
    let pem = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/keys/rsa4096-test-only.pem"),
    )
    .expect("committed RSA test key");
    SigningKey::from_pkcs8_pem(&pem).expect("RSA test key parses")
}

fn far() -> Timestamp {
    "2040-01-01T00:00:00Z".parse().expect("timestamp")
}

fn root_v1(root: &[&SigningKey], threshold: u32) -> TrustRoot {
    let pubs: Vec<&PublicKey> = root.iter().map(|k| k.public_key()).collect();
    let doc = RootDocument::new(1, far(), (&pubs, threshold), (&pubs, 1), (&[ed(200).public_key()], 1));
    TrustRoot::from_trusted_json(&doc.sign(root).expect("sign").to_json()).expect("valid root")
}

#[test]
fn rsa_pss_signatures_verify_and_count_with_ed25519() {
    let rsa = rsa_test_key();
    assert_eq!(rsa.algorithm(), Algorithm::RsaPssSha256);
    let e = ed(1);
    let doc = RootDocument::new(
        1,
        far(),
        (&[e.public_key()], 1),
        (&[e.public_key(), rsa.public_key()], 2),
        (&[ed(200).public_key()], 1),
    );
    let root = TrustRoot::from_trusted_json(&doc.sign(&[&e]).expect("sign").to_json()).expect("root");
    let env = Envelope::sign("application/x-test", b"payload".to_vec(), &[&e, &rsa]).expect("sign");
    assert_eq!(root.verify(&env, Role::Release, "application/x-test").expect("two distinct keys"), b"payload");

    let only_rsa = Envelope::sign("application/x-test", b"payload".to_vec(), &[&rsa]).expect("sign");
    assert!(matches!(
        root.verify(&only_rsa, Role::Release, "application/x-test"),
        Err(SignatureError::BelowThreshold { valid: 1, threshold: 2, .. })
    ));

    let mut tampered = env.clone();
    tampered.payload = b"paylaod".to_vec();
    assert!(matches!(
        root.verify(&tampered, Role::Release, "application/x-test"),
        Err(SignatureError::BadSignature { .. })
    ));
}

#[test]
fn rsa_key_pem_roundtrip_and_size_pinned() {
    let rsa = rsa_test_key();
    let pem = rsa.to_pkcs8_pem().expect("pem");
    assert_eq!(SigningKey::from_pkcs8_pem(&pem).expect("again").public_key(), rsa.public_key());
    let public = PublicKey::from_pem(Algorithm::RsaPssSha256, &rsa.public_key().to_pem()).expect("public pem");
    assert_eq!(public.key_id(), rsa.public_key().key_id());
    // An RSA key listed as Ed25519 does not parse as one.
    assert!(PublicKey::from_spki_der(Algorithm::Ed25519, rsa.public_key().spki_der()).is_err());
}

#[test]
fn rotation_with_both_thresholds_is_accepted_then_old_keys_lose_power() {
    let (a, b, c) = (ed(1), ed(2), ed(3));
    let v1 = root_v1(&[&a, &b], 2);
    let v2_doc = RootDocument::new(
        2,
        far(),
        (&[b.public_key(), c.public_key()], 2),
        (&[c.public_key()], 1),
        (&[ed(200).public_key()], 1),
    );
    // Signed by a+b (old threshold) and b+c (new threshold).
    let v2_json = v2_doc.sign(&[&a, &b, &c]).expect("sign").to_json();
    let v2 = v1.rotate(&v2_json).expect("rotation with both thresholds");
    assert_eq!(v2.version(), 2);
    assert_eq!(v2.envelope_json(), &v2_json[..], "stored verbatim");

    // Key a is gone: a v3 signed by a and c fails the v2 threshold.
    let v3 = RootDocument { version: 3, ..v2_doc.clone() };
    let err = v2.rotate(&v3.sign(&[&a, &c]).expect("sign").to_json()).expect_err("a is no longer a root key");
    assert!(matches!(err, RootUpdateError::NotSignedByCurrent(SignatureError::BelowThreshold { valid: 1, .. })));

    // Rotation signed by the old threshold only, not the new one, also fails.
    let v2_old_only = v2_doc.sign(&[&a, &b]).expect("sign").to_json();
    let err = v1.rotate(&v2_old_only).expect_err("needs its own threshold too");
    assert!(matches!(err, RootUpdateError::NotSignedBySelf(SignatureError::BelowThreshold { valid: 1, .. })));
}

#[test]
fn weak_ed25519_key_is_refused() {
    // SPKI of the Ed25519 identity point, a small-order key under which forged signatures
    // verify with the lax check.
    let mut der = hex_bytes("302a300506032b6570032100");
    let mut identity = [0u8; 32];
    identity[0] = 1;
    der.extend_from_slice(&identity);
    assert!(matches!(PublicKey::from_spki_der(Algorithm::Ed25519, &der), Err(KeyError::Invalid { .. })));
}

#[test]
fn signing_key_debug_prints_nothing_secret() {
    assert_eq!(format!("{:?}", ed(9)), "SigningKey(..)");
}

fn hex_bytes(s: &str) -> Vec<u8> {
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex")).collect()
}

fn targeted_manifest(platforms: &[&str], architectures: &[&str]) -> flotilla_core::manifest::Manifest {
    use flotilla_core::chunking::ChunkParams;
    use flotilla_core::ids::{Blake3Digest, IndexId, Sha256Digest};
    use flotilla_core::manifest::{Compatibility, IndexRef, Manifest, Payload, PayloadKind};
    let now = Timestamp::now();
    Manifest {
        schema_version: flotilla_core::manifest::MANIFEST_SCHEMA_VERSION,
        product: "kiosk".into(),
        channel: "stable".into(),
        version: semver::Version::new(1, 0, 0),
        version_code: 1,
        security_version: 0,
        payload: Payload {
            kind: PayloadKind::Raw,
            size: 0,
            sha256: Sha256Digest::of(b""),
            blake3: Blake3Digest::of(b""),
        },
        chunking: ChunkParams::BUNDLE,
        index: IndexRef { id: IndexId::of(b"index"), size: 1024 },
        deltas: Vec::new(),
        compatibility: Compatibility {
            platforms: platforms.iter().map(|s| (*s).to_owned()).collect(),
            architectures: architectures.iter().map(|s| (*s).to_owned()).collect(),
            ..Default::default()
        },
        mandatory: false,
        created_at: now,
        expires_at: far(),
        notes: None,
    }
}

#[test]
fn platform_and_architecture_targeting_is_checked_on_the_device() {
    use flotilla_core::manifest::{DeviceContext, ManifestError, verify_for_device};
    let key = ed(1);
    let root = root_v1(&[&key], 1);
    let signed = |m: &flotilla_core::manifest::Manifest| m.sign(&[&key]).expect("sign").to_json();
    let device = |platform: Option<&str>, arch: Option<&str>| {
        let mut ctx = DeviceContext::new("kiosk", "stable", Timestamp::now());
        ctx.platform = platform.map(str::to_owned);
        ctx.architecture = arch.map(str::to_owned);
        ctx
    };

    let targeted = signed(&targeted_manifest(&["linux", "android"], &["aarch64"]));
    verify_for_device(&targeted, &root, &device(Some("android"), Some("aarch64"))).expect("a listed target installs");
    let err = verify_for_device(&targeted, &root, &device(Some("ios"), Some("aarch64"))).expect_err("other platform");
    assert!(
        matches!(&err, ManifestError::WrongPlatform { device, supported } if device == "ios" && supported.len() == 2),
        "{err}"
    );
    let err = verify_for_device(&targeted, &root, &device(Some("linux"), Some("x86_64"))).expect_err("other arch");
    assert!(matches!(&err, ManifestError::WrongArchitecture { device, .. } if device == "x86_64"), "{err}");
    // A device that does not say what it runs is not sent a targeted release.
    let err = verify_for_device(&targeted, &root, &device(None, None)).expect_err("unknown platform");
    assert!(matches!(err, ManifestError::WrongPlatform { .. }), "{err}");

    // An untargeted manifest installs anywhere, and its JSON carries no empty lists.
    let open = targeted_manifest(&[], &[]);
    assert!(!String::from_utf8(open.to_json()).expect("utf-8").contains("platforms"));
    verify_for_device(&signed(&open), &root, &device(None, Some("riscv64"))).expect("untargeted");

    // Names are bounded like hardware models.
    let err = targeted_manifest(&["linux os"], &[]).sign(&[&key]).expect_err("space in a platform name");
    assert!(matches!(err, ManifestError::Invalid { field: "compatibility.platforms", .. }), "{err}");
    let many: Vec<String> = (0..33).map(|i| format!("arch{i}")).collect();
    let many: Vec<&str> = many.iter().map(String::as_str).collect();
    let err = targeted_manifest(&[], &many).sign(&[&key]).expect_err("too many architectures");
    assert!(matches!(err, ManifestError::Invalid { field: "compatibility.architectures", .. }), "{err}");
}
