//! Crash-loop probation after a commit: a committed slot that stops reaching healthy within
//! the window is rolled back to the intact previous slot and blacklisted; an app's reported
//! crashes do the same for a bundle; once the window is over the commit is final.

use std::time::Duration;

use crate::support::*;

#[test]
fn committed_slot_that_crash_loops_during_probation_is_rolled_back() {
    let coord = Coordinator::start();
    let publisher = Publisher::new(&coord);
    let marker = publisher.path("app-is-healthy");
    std::fs::write(&marker, b"").unwrap();
    let opts = DeviceOptions {
        health: format!(
            "probation_boots = 1\ncrash_limit = 2\nchecks = [{{ command = \"test -f {}\" }}]",
            marker.display()
        ),
        ..DeviceOptions::default()
    };
    let dev = Device::new(&coord, &publisher.path("root.json"), SlotKind::File, &opts);

    let v1 = image(51, 1 << 20);
    std::fs::write(publisher.path("v1.img"), &v1).unwrap();
    publisher.release("1.0.0", &publisher.path("v1.img"), &[]);
    assert_eq!(dev.check_once()["outcome"], "staged");
    assert_eq!(dev.boot_check().1["outcome"], "committed");
    assert_eq!(dev.status()["probation"]["healthy_boots"], 0, "{}", dev.status());
    // One healthy boot ends v1's window.
    assert_eq!(dev.boot_check().1, serde_json::json!({ "outcome": "normal", "slot": "B" }));
    assert!(dev.status()["probation"].is_null(), "{}", dev.status());

    let v2 = edited(&v1, 3, 1);
    std::fs::write(publisher.path("v2.img"), &v2).unwrap();
    let r2 = publisher.release("1.1.0", &publisher.path("v2.img"), &[]);
    assert_eq!(dev.check_once()["slot"], "A");
    assert_eq!(dev.boot_check().1["outcome"], "committed");
    let st = dev.status();
    assert_eq!(st["installed"]["version"], "1.1.0");
    assert_eq!(st["probation"]["crashes"], 0, "{st}");

    // While v2 is on probation nothing may overwrite slot B (v1, the fallback).
    let v3 = edited(&v1, 5, 2);
    std::fs::write(publisher.path("v3.img"), &v3).unwrap();
    publisher.release("1.2.0", &publisher.path("v3.img"), &[]);
    assert_eq!(dev.check_once(), serde_json::json!({ "outcome": "on_probation", "version": "1.1.0" }));
    assert_eq!(dev.slot_image("b"), v1);

    // v2 stops reaching healthy: the first boot asks for a reboot, the second rolls back.
    std::fs::remove_file(&marker).unwrap();
    let (code, report) = dev.boot_check();
    assert_eq!(code, 2, "{report}");
    assert_eq!(report["outcome"], "retry_after_reboot");
    assert_eq!(report["attempts"], 1);
    let (code, report) = dev.boot_check();
    assert_eq!(code, 3, "{report}");
    assert_eq!(report["outcome"], "rolled_back");
    assert_eq!(report["slot"], "B");
    let reason = report["reason"].as_str().unwrap();
    assert!(reason.contains("crash loop during probation") && reason.contains("2 boots in a row"), "{report}");

    let st = dev.status();
    assert_eq!(st["state"], "rolled_back");
    assert_eq!(st["active_slot"], "B");
    assert_eq!(st["selected_slot"], "B");
    assert_eq!(st["installed"]["version"], "1.0.0");
    assert!(st["probation"].is_null());
    assert_eq!(st["blacklist"].as_array().unwrap().len(), 1, "{st}");
    assert_eq!(dev.slot_image("b"), v1, "the fallback slot is intact");
    std::fs::write(&marker, b"").unwrap();
    assert_eq!(dev.boot_check().1, serde_json::json!({ "outcome": "normal", "slot": "B" }));

    // The coordinator sees the rollback of v2.
    let id = r2["id"].as_i64().unwrap();
    wait_for("the rolled_back report", Duration::from_secs(30), || {
        (publisher.show(id)["rollout"]["failed"].as_i64() >= Some(1)).then_some(())
    });
}

#[test]
fn after_the_window_the_commit_is_final() {
    let coord = Coordinator::start();
    let publisher = Publisher::new(&coord);
    let marker = publisher.path("app-is-healthy");
    std::fs::write(&marker, b"").unwrap();
    let opts = DeviceOptions {
        health: format!(
            "probation_boots = 2\ncrash_limit = 1\nchecks = [{{ command = \"test -f {}\" }}]",
            marker.display()
        ),
        ..DeviceOptions::default()
    };
    let dev = Device::new(&coord, &publisher.path("root.json"), SlotKind::File, &opts);
    let v1 = image(52, 1 << 20);
    std::fs::write(publisher.path("v1.img"), &v1).unwrap();
    publisher.release("1.0.0", &publisher.path("v1.img"), &["--security-version", "4"]);
    assert_eq!(dev.check_once()["outcome"], "staged");
    assert_eq!(dev.boot_check().1["outcome"], "committed");
    // The anti-rollback floor waits for the end of the window.
    assert_eq!(dev.status()["security_floor"], 0);
    assert_eq!(dev.boot_check().1["outcome"], "normal");
    assert_eq!(dev.status()["probation"]["healthy_boots"], 1);
    assert_eq!(dev.boot_check().1["outcome"], "normal");
    let st = dev.status();
    assert!(st["probation"].is_null(), "{st}");
    assert_eq!(st["security_floor"], 4);

    // Final: a failing health check no longer rolls back, and a reported crash is not counted.
    std::fs::remove_file(&marker).unwrap();
    assert_eq!(dev.boot_check().1, serde_json::json!({ "outcome": "normal", "slot": "B" }));
    let out = dev.run(&["report-crash", "--json"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(json_of(&out)["outcome"], "not_on_probation");
    assert_eq!(dev.status()["installed"]["version"], "1.0.0");
    assert_eq!(dev.selected_slot(), "B");
}

#[test]
fn app_crash_counter_rolls_a_bundle_back_during_probation() {
    let coord = Coordinator::start();
    let publisher = Publisher::new(&coord);
    let opts = DeviceOptions { health: "probation_boots = 1\ncrash_limit = 2".into(), ..DeviceOptions::default() };
    let dev = Device::new(&coord, &publisher.path("root.json"), SlotKind::Dir, &opts);
    let bundle = publisher.path("bundle");
    std::fs::create_dir_all(&bundle).unwrap();
    std::fs::write(bundle.join("main.js"), image(53, 200_000)).unwrap();
    publisher.release("1.0.0", &bundle, &[]);
    assert_eq!(dev.check_once()["outcome"], "staged");
    assert_eq!(dev.boot_check().1["outcome"], "committed");
    assert_eq!(dev.boot_check().1["outcome"], "normal"); // the window of 1.0.0 ends

    std::fs::write(bundle.join("main.js"), image(54, 200_000)).unwrap();
    let r2 = publisher.release("1.1.0", &bundle, &[]);
    assert_eq!(dev.check_once()["outcome"], "staged");
    assert_eq!(dev.boot_check().1["outcome"], "committed");
    assert_eq!(std::fs::read_link(dev.path("bundles/current")).unwrap(), std::path::Path::new("a"));

    // The app crashes twice in a row on the new bundle (its crash handler reports it).
    let out = dev.run(&["report-crash", "--json"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(json_of(&out)["attempts"], 1);
    let out = dev.run(&["report-crash", "--json"]);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    let report = json_of(&out);
    assert_eq!(report["outcome"], "rolled_back");
    assert!(report["reason"].as_str().unwrap().contains("crash loop during probation: 2 crashes in a row"), "{report}");
    assert_eq!(std::fs::read_link(dev.path("bundles/current")).unwrap(), std::path::Path::new("b"));
    assert_eq!(std::fs::read(dev.path("bundles/b/main.js")).unwrap(), image(53, 200_000), "1.0.0 is back");
    let st = dev.status();
    assert_eq!(st["installed"]["version"], "1.0.0");
    assert_eq!(st["state"], "rolled_back");
    let id = r2["id"].as_i64().unwrap();
    wait_for("the rolled_back report", Duration::from_secs(30), || {
        (publisher.show(id)["rollout"]["failed"].as_i64() >= Some(1)).then_some(())
    });
}
