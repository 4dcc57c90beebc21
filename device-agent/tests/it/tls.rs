//! The CLI and the agent over HTTPS: a coordinator serving the fleet's own certificate, a
//! publisher trusting its CA through `FLOTILLA_CA_CERT`, an agent through `ca_cert`. An agent
//! without the CA refuses to talk to the server at all (its token would go to anyone).

use crate::support::*;

#[test]
fn publish_and_install_over_https_with_a_private_ca() {
    let coord = Coordinator::start_tls();
    assert!(coord.url.starts_with("https://"), "{}", coord.url);
    let publisher = Publisher::new(&coord);
    let v1 = image(71, 1 << 20);
    std::fs::write(publisher.path("v1.img"), &v1).unwrap();
    publisher.release("1.0.0", &publisher.path("v1.img"), &[]);

    // Without the fleet's CA the agent cannot enroll: the server's certificate is not trusted.
    let stranger = Device::new(&coord, &publisher.path("root.json"), SlotKind::File, &DeviceOptions::default());
    let out = stranger.run(&["check-once"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("coordinator unreachable"), "{stderr}");
    assert!(stranger.slot_image("b").is_empty(), "nothing was written");

    let opts = DeviceOptions {
        id: "dev-tls".into(),
        extra: format!("ca_cert = \"{}\"", tls_fixture("ca.pem").display()),
        ..DeviceOptions::default()
    };
    let dev = Device::new(&coord, &publisher.path("root.json"), SlotKind::File, &opts);
    assert_eq!(dev.check_once()["outcome"], "staged");
    assert_eq!(dev.boot_check().1["outcome"], "committed");
    assert_eq!(dev.slot_image("B"), v1);

    // A CA file that holds no certificate is a configuration error, named as such.
    std::fs::write(dev.path("empty-ca.pem"), "").unwrap();
    let bad = DeviceOptions { extra: format!("ca_cert = \"{}\"", dev.path("empty-ca.pem").display()), ..opts };
    dev.write_config(&coord.url, &bad);
    let out = dev.run(&["check-once"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("no PEM certificate"), "{stderr}");
}
