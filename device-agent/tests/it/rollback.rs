//! Automatic rollback: a failing health check after the attempt limit, a bundle never marked
//! healthy at the timeout; the coordinator sees `rolled_back` and pauses the rollout.

use std::time::Duration;

use crate::support::*;

#[test]
fn failing_health_check_rolls_back_after_the_attempt_limit() {
    let coord = Coordinator::start();
    let publisher = Publisher::new(&coord);
    let marker = publisher.path("app-is-healthy");
    std::fs::write(&marker, b"").unwrap();
    let opts = DeviceOptions {
        health: format!("checks = [{{ command = \"test -f {}\" }}]", marker.display()),
        ..DeviceOptions::default()
    };
    let dev = Device::new(&coord, &publisher.path("root.json"), SlotKind::File, &opts);

    let v1 = image(31, 1 << 20);
    std::fs::write(publisher.path("v1.img"), &v1).unwrap();
    publisher.release("1.0.0", &publisher.path("v1.img"), &[]);
    assert_eq!(dev.check_once()["outcome"], "staged");
    assert_eq!(dev.boot_check().1["outcome"], "committed");

    // v2 breaks the health check.
    std::fs::remove_file(&marker).unwrap();
    let v2 = edited(&v1, 3, 1);
    std::fs::write(publisher.path("v2.img"), &v2).unwrap();
    // A staged rollout that pauses above 2 % failures. Its first stage reaches 99.99 % of
    // devices (a single 100 % stage would be complete at once and never evaluated).
    publisher.set_stages(serde_json::json!([
        { "percent": 99.99, "min_reports": 1000, "max_failure_rate": 0.02, "min_duration": "1h" },
        { "percent": 100.0 }
    ]));
    let r2 = publisher.release("1.1.0", &publisher.path("v2.img"), &["--rollout", "staged"]);
    assert_eq!(dev.check_once()["slot"], "A");
    for attempt in 1..=2 {
        let (code, report) = dev.boot_check();
        assert_eq!(code, 2, "{report}");
        assert_eq!(report["outcome"], "retry_after_reboot");
        assert_eq!(report["attempts"], attempt);
        assert_eq!(dev.status()["state"], "trial");
    }
    let (code, report) = dev.boot_check();
    assert_eq!(code, 3, "{report}");
    assert_eq!(report["outcome"], "rolled_back");
    assert_eq!(report["slot"], "B");
    assert!(report["reason"].as_str().unwrap().contains("boot attempt 3 of 3"), "{report}");

    let st = dev.status();
    assert_eq!(st["state"], "rolled_back");
    assert_eq!(st["active_slot"], "B");
    assert_eq!(st["selected_slot"], "B");
    assert_eq!(st["installed"]["version"], "1.0.0");
    assert_eq!(dev.slot_image("b"), v1, "the previous slot is untouched");
    // The next boot runs the old slot normally.
    assert_eq!(dev.boot_check().1, serde_json::json!({ "outcome": "normal", "slot": "B" }));

    // The rolled-back release is never installed again: the unchanged offer is answered 304,
    // and a full check (no ETag) refuses it.
    assert_eq!(dev.check_once()["outcome"], "up_to_date");
    std::fs::remove_file(dev.path("state/etag")).unwrap();
    let out = dev.run(&["check-once"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("was rolled back on this device"), "{out:?}");

    // The coordinator sees the rollback and its failure-rate guardrail pauses the rollout.
    let id = r2["id"].as_i64().unwrap();
    let rel = wait_for("the rollout to pause", Duration::from_secs(30), || {
        let r = publisher.show(id);
        (r["rollout"]["state"] == "paused").then_some(r)
    });
    assert!(rel["rollout"]["failed"].as_i64().unwrap() >= 1, "{rel}");
    assert!(rel["rollout"]["reason"].as_str().unwrap().contains("failure rate"), "{rel}");
}

#[test]
fn bundle_never_marked_healthy_rolls_back_at_the_timeout() {
    let coord = Coordinator::start();
    let publisher = Publisher::new(&coord);
    let opts =
        DeviceOptions { health: "mark_good_timeout = \"1s\"".into(), boot_attempts: 1, ..DeviceOptions::default() };
    let dev = Device::new(&coord, &publisher.path("root.json"), SlotKind::Dir, &opts);
    let bundle = publisher.path("bundle");
    std::fs::create_dir_all(&bundle).unwrap();
    std::fs::write(bundle.join("main.js"), image(41, 300_000)).unwrap();
    publisher.release("1.0.0", &bundle, &[]);
    assert_eq!(dev.check_once()["outcome"], "staged");

    // The app starts on the new bundle and marks it healthy while boot-check waits.
    let boot_check = dev.cmd(&["boot-check", "--json"]).stdout(std::process::Stdio::piped()).spawn().unwrap();
    wait_for("the trial to start", Duration::from_secs(20), || (dev.status()["state"] == "trial").then_some(()));
    dev.ok(&["mark-good"]);
    let out = boot_check.wait_with_output().unwrap();
    assert!(out.status.success());
    assert_eq!(json_of(&out)["outcome"], "committed");

    // v2 starts but never marks itself healthy.
    std::fs::write(bundle.join("main.js"), image(42, 300_000)).unwrap();
    let r2 = publisher.release("1.1.0", &bundle, &[]);
    assert_eq!(dev.check_once()["outcome"], "staged");
    assert_eq!(std::fs::read_link(dev.path("bundles/current")).unwrap(), std::path::Path::new("a"));
    let (code, report) = dev.boot_check();
    assert_eq!(code, 3, "{report}");
    assert!(report["reason"].as_str().unwrap().contains("not marked healthy within 1s"), "{report}");
    assert_eq!(std::fs::read_link(dev.path("bundles/current")).unwrap(), std::path::Path::new("b"));
    assert_eq!(dev.status()["installed"]["version"], "1.0.0");
    let id = r2["id"].as_i64().unwrap();
    wait_for("the rolled_back report", Duration::from_secs(20), || {
        (publisher.show(id)["rollout"]["failed"].as_i64() >= Some(1)).then_some(())
    });
}
