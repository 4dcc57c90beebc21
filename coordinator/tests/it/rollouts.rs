//! Staged rollouts: cohorts, operator actions, the audit log, the evaluator, rollback, and
//! one evaluator among replicas.

use std::time::Duration;

use flotilla_coordinator::rollout::{evaluate, take_lease};
use reqwest::StatusCode;
use serde_json::json;

use crate::support::{Engine, Keys, image, manifest_for, release, start, start_with};

const SECRET: &str = "enroll-secret-0123456789";

async fn offered(s: &crate::support::Server, token: &str) -> Option<i64> {
    let (status, body) = s.get("/v1/updates/check?version_code=1", Some(token)).await;
    match status {
        StatusCode::OK => body["release_id"].as_i64(),
        StatusCode::NO_CONTENT => None,
        other => panic!("check answered {other}: {body}"),
    }
}

async fn cohorts_and_operator_actions(engine: Engine) {
    let s = start(engine).await;
    let keys = Keys::new(4);
    let api = s.create_product("fleet", &keys, SECRET).await;
    let stages = json!({ "stages": [
        { "percent": 10, "min_reports": 1000, "max_failure_rate": 0.5, "min_duration": "1h" },
        { "percent": 50, "min_reports": 1000, "max_failure_rate": 0.5, "min_duration": "1h" },
        { "percent": 100 },
    ]});
    let id = release(&s, &api, &keys, "fleet", "1.0.0", 2, &image(9, 50_000), stages).await;
    let mut tokens = Vec::new();
    for i in 0..120 {
        tokens.push(s.enroll("fleet", &format!("d-{i}"), "stable", SECRET, None).await);
    }
    let mut at_10 = Vec::new();
    for t in &tokens {
        at_10.push(offered(&s, t).await.is_some());
    }
    let n10 = at_10.iter().filter(|x| **x).count();
    assert!((2..=30).contains(&n10), "about 10 % of 120 devices, got {n10}");

    // Pause keeps the cohort; a second pause conflicts.
    let (status, body) =
        s.post(&format!("/v1/releases/{id}/pause"), Some(&api), json!({ "reason": "checking logs" })).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["state"], "paused");
    let (status, _) = s.post(&format!("/v1/releases/{id}/pause"), Some(&api), json!({})).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(offered(&s, &tokens[at_10.iter().position(|x| *x).expect("someone is in")]).await, Some(id));

    // Resume, advance to 50 %: everyone who had it keeps it.
    assert_eq!(s.post(&format!("/v1/releases/{id}/resume"), Some(&api), json!({})).await.0, StatusCode::OK);
    let (status, body) = s.post(&format!("/v1/releases/{id}/advance"), Some(&api), json!({})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["basis_points"], 5000);
    let mut n50 = 0;
    for (t, was_in) in tokens.iter().zip(&at_10) {
        let now_in = offered(&s, t).await.is_some();
        assert!(!was_in || now_in, "a device in the 10 % cohort stays in at 50 %");
        n50 += usize::from(now_in);
    }
    assert!(n50 > n10 && (35..=85).contains(&n50), "about half of 120, got {n50}");

    // Set 100 %, then halt: nobody is offered a halted release.
    let (_, body) = s.post(&format!("/v1/releases/{id}/percentage"), Some(&api), json!({ "percent": 100 })).await;
    assert_eq!(body["basis_points"], 10000);
    assert!(offered(&s, &tokens[0]).await.is_some());
    let (status, _) = s.post(&format!("/v1/releases/{id}/halt"), Some(&api), json!({ "reason": "bad build" })).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(offered(&s, &tokens[0]).await, None);

    // Every action is in the audit log with before and after.
    let (_, log) = s.get("/v1/audit", Some(&s.admin)).await;
    let actions: Vec<&str> =
        log["entries"].as_array().expect("entries").iter().map(|e| e["action"].as_str().expect("action")).collect();
    for a in ["publish", "pause", "resume", "advance", "set_percentage", "halt"] {
        assert!(actions.contains(&a), "audit log lacks {a}: {actions:?}");
    }
    let halt = &log["entries"][0];
    assert_eq!(halt["action"], "halt");
    assert_eq!(halt["before"]["state"], "completed");
    assert_eq!(halt["after"]["state"], "halted");
    assert!(halt["actor"].as_str().expect("actor").starts_with("publish:"));
}

async fn evaluator_advances_and_pauses(engine: Engine) {
    let s = start(engine).await;
    let keys = Keys::new(5);
    let api = s.create_product("eval", &keys, SECRET).await;
    let stages = json!({ "stages": [
        { "percent": 100.0 * 0.5, "min_reports": 2, "max_failure_rate": 0.3, "min_duration": "0s" },
        { "percent": 100 },
    ]});
    let good = release(&s, &api, &keys, "eval", "1.0.0", 2, &image(1, 30_000), stages.clone()).await;
    let dev = s.enroll("eval", "e-1", "stable", SECRET, None).await;
    let dev2 = s.enroll("eval", "e-2", "stable", SECRET, None).await;

    // Too few reports: no change.
    let ev = evaluate(&s.state).await.expect("evaluate");
    assert!(ev.leader && ev.advanced.is_empty() && ev.paused.is_empty());
    for t in [&dev, &dev2] {
        s.post("/v1/devices/events", Some(t), json!({ "events": [{ "kind": "healthy", "release_id": good }] })).await;
    }
    let ev = evaluate(&s.state).await.expect("evaluate");
    assert_eq!(ev.advanced, vec![good]);
    let (_, rel) = s.get(&format!("/v1/releases/{good}"), Some(&api)).await;
    assert_eq!(rel["rollout"]["state"], "completed");
    assert_eq!(rel["rollout"]["percent"], 100.0);

    let bad = release(&s, &api, &keys, "eval", "1.1.0", 3, &image(2, 30_000), stages).await;
    for (t, kind) in [(&dev, "failed"), (&dev2, "healthy")] {
        s.post(
            "/v1/devices/events",
            Some(t),
            json!({ "events": [{ "kind": kind, "release_id": bad, "detail": "boot loop" }] }),
        )
        .await;
    }
    let ev = evaluate(&s.state).await.expect("evaluate");
    assert_eq!(ev.paused, vec![bad]);
    let (_, rel) = s.get(&format!("/v1/releases/{bad}"), Some(&api)).await;
    assert_eq!(rel["rollout"]["state"], "paused");
    assert!(rel["rollout"]["reason"].as_str().expect("reason").contains("failure rate 50.0 %"), "{rel}");
}

async fn rollback_republishes_earlier_content(engine: Engine) {
    let s = start(engine).await;
    let keys = Keys::new(6);
    let api = s.create_product("rb", &keys, SECRET).await;
    let v1 = image(11, 200_000);
    let first = release(&s, &api, &keys, "rb", "1.0.0", 1, &v1, json!({ "percent": 100 })).await;
    let second = release(&s, &api, &keys, "rb", "1.1.0", 2, &image(12, 200_000), json!({ "percent": 100 })).await;
    let dev = s.enroll("rb", "r-1", "stable", SECRET, None).await;
    assert_eq!(offered(&s, &dev).await, Some(second));

    // A rollback manifest must carry earlier content.
    let (chunked_other, _) = s.upload(&api, &image(13, 10_000)).await;
    let not_earlier = manifest_for("rb", "stable", "1.0.1", 3, &chunked_other);
    let env = String::from_utf8(not_earlier.sign(&[&keys.release]).expect("sign").to_json()).expect("utf-8");
    let (status, body) =
        s.post(&format!("/v1/releases/{second}/rollback"), Some(&api), json!({ "manifest": env })).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");

    // The CLI signs v1's content under version_code 3; no chunk upload happens.
    let chunked = flotilla_core::chunking::Chunker::new(flotilla_core::chunking::ChunkParams::BUNDLE)
        .chunk_reader(&v1[..])
        .expect("chunk");
    let m = manifest_for("rb", "stable", "1.0.2", 3, &chunked);
    let env = String::from_utf8(m.sign(&[&keys.release]).expect("sign").to_json()).expect("utf-8");
    let (status, body) =
        s.post(&format!("/v1/releases/{second}/rollback"), Some(&api), json!({ "manifest": env })).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["content_of"], first);
    let replacement = body["id"].as_i64().expect("id");
    assert_eq!(offered(&s, &dev).await, Some(replacement));
    let (_, rel) = s.get(&format!("/v1/releases/{second}"), Some(&api)).await;
    assert_eq!(rel["rollout"]["state"], "halted");
}

async fn one_evaluator_among_replicas(engine: Engine) {
    let a = start(engine).await;
    // A second replica on the same database (PostgreSQL) — for SQLite, the same file.
    let url = a.database_url.clone();
    let b = start_with(engine, |c| c.database_url = Some(flotilla_coordinator::config::Secret::new(url))).await;
    assert_ne!(a.state.instance, b.state.instance);
    let (ra, rb) = tokio::join!(take_lease(&a.state, "test-lease", 60), take_lease(&b.state, "test-lease", 60));
    assert!(ra.expect("lease a") ^ rb.expect("lease b"), "exactly one replica holds the lease");
    let holder = if take_lease(&a.state, "test-lease", 60).await.expect("renew") { &a } else { &b };
    let other = if std::ptr::eq(holder, &a) { &b } else { &a };
    assert!(
        !take_lease(&other.state, "test-lease", 60).await.expect("lease"),
        "the other replica cannot take a held lease"
    );
    // Evaluations race: only one leads each time.
    for _ in 0..5 {
        let (ea, eb) = tokio::join!(evaluate(&a.state), evaluate(&b.state));
        assert!(ea.expect("a").leader ^ eb.expect("b").leader);
    }
    // An expired lease moves.
    sqlx::query("UPDATE leases SET expires_at = 0").execute(&a.state.db.pool).await.expect("expire");
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert!(take_lease(&other.state, "test-lease", 60).await.expect("lease"));
}

crate::both_engines!(
    cohorts_and_operator_actions,
    evaluator_advances_and_pauses,
    rollback_republishes_earlier_content,
    one_evaluator_among_replicas
);

/// The crash-rate guardrail halts a release whose installs fail en masse, even one whose
/// rollout is complete, and the update check stops offering it; under its report minimum it
/// does nothing.
async fn crash_rate_guardrail_halts(engine: Engine) {
    let s = start_with(engine, |c| {
        c.guardrail.min_reports = 4;
        c.guardrail.failure_rate = 0.5;
    })
    .await;
    let keys = Keys::new(6);
    let api = s.create_product("guard", &keys, SECRET).await;
    let everyone = json!({ "stages": [{ "percent": 100 }] });
    let bad = release(&s, &api, &keys, "guard", "1.0.0", 2, &image(7, 30_000), everyone).await;
    let mut devices = Vec::new();
    for i in 0..5 {
        devices.push(s.enroll("guard", &format!("g-{i}"), "stable", SECRET, None).await);
    }
    let (_, rel) = s.get(&format!("/v1/releases/{bad}"), Some(&api)).await;
    assert_eq!(rel["rollout"]["state"], "completed", "{rel}");
    assert_eq!(offered(&s, &devices[4]).await, Some(bad));

    // Two failures of three: over 50 %, but under the guardrail's report minimum.
    for (t, kind) in [(&devices[0], "failed"), (&devices[1], "rolled_back"), (&devices[2], "healthy")] {
        s.post("/v1/devices/events", Some(t), json!({ "events": [{ "kind": kind, "release_id": bad }] })).await;
    }
    let ev = evaluate(&s.state).await.expect("evaluate");
    assert!(ev.halted.is_empty(), "{ev:?}");
    assert_eq!(offered(&s, &devices[4]).await, Some(bad));

    // A fourth report, failed: 3 of 4, at the minimum → halted.
    s.post("/v1/devices/events", Some(&devices[3]), json!({ "events": [{ "kind": "failed", "release_id": bad }] }))
        .await;
    let ev = evaluate(&s.state).await.expect("evaluate");
    assert_eq!(ev.halted, vec![bad], "{ev:?}");
    let (_, rel) = s.get(&format!("/v1/releases/{bad}"), Some(&api)).await;
    assert_eq!(rel["rollout"]["state"], "halted", "{rel}");
    assert!(rel["rollout"]["reason"].as_str().expect("reason").contains("crash-rate guardrail: 3 of 4"), "{rel}");
    assert_eq!(offered(&s, &devices[4]).await, None, "a halted release is no longer offered");
    // Halted stays halted: the next pass does nothing.
    assert!(evaluate(&s.state).await.expect("evaluate").halted.is_empty());
}

crate::both_engines!(crash_rate_guardrail_halts);
