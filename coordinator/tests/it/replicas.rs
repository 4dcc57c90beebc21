//! Two replicas of the coordinator on one database, each with its own background tasks: a
//! release published through one is offered by the other once its cache refreshes, and only
//! the replica holding the evaluator lease evaluates; when it shuts down it gives the lease
//! back and the other takes over at once. (A holder killed outright, whose lease must expire
//! first, is the publisher's two-process test.)

use std::sync::atomic::Ordering;
use std::time::Duration;

use flotilla_coordinator::config::{Config, Secret};
use flotilla_core::rollout::verify_assignment;
use flotilla_core::time::Timestamp;
use flotilla_core::trust::TrustRoot;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::support::{Engine, Keys, Server, image, release, start_with, wait_for};

const SECRET: &str = "enroll-secret-0123456789";
/// Generous: the machine running the tests may be busy; the conditions, not the time, are tested.
const LIMIT: Duration = Duration::from_secs(60);

/// Evaluator every second with a 10 min lease (longer than the test may take, so only a
/// lease given back can move leadership); the release cache refreshes every 200 ms.
fn fast(c: &mut Config) {
    c.evaluator_interval = Duration::from_secs(1);
    c.evaluator_lease = Some(Duration::from_secs(600));
    c.cache_refresh = Duration::from_millis(200);
}

/// The evaluator's advances of `release`, oldest first: (actor, stage reached, time).
async fn advances(s: &Server, admin: &str, release: i64) -> Vec<(String, i64, i64)> {
    let (status, body) = s.get("/v1/audit?limit=10000", Some(admin)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let mut out: Vec<(String, i64, i64)> = body["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .filter(|e| e["action"] == "advance" && e["target"] == format!("release:{release}"))
        .map(|e| {
            (
                e["actor"].as_str().expect("actor").to_owned(),
                e["after"]["stage"].as_i64().expect("stage"),
                e["at"].as_i64().expect("at"),
            )
        })
        .collect();
    out.reverse();
    out
}

async fn two_replicas_one_database(engine: Engine) {
    let a = start_with(engine, fast).await;
    let (url, key) = (a.database_url.clone(), a.state.config.data_dir.join("rollout-key.pem"));
    // Replicas share the database and the rollout key (one identity towards devices).
    let b = start_with(engine, |c| {
        fast(c);
        c.database_url = Some(Secret::new(url));
        c.rollout_key_file = Some(key);
    })
    .await;
    assert_ne!(a.state.instance, b.state.instance);
    let admin = a.admin.clone();
    let keys = Keys::new(31);
    let api = a.create_product("fleet", &keys, SECRET).await;
    let device = b.enroll("fleet", "dev-r", "stable", SECRET, None).await;
    let check = |s: &Server| {
        let (url, device) = (format!("{}/v1/updates/check?nonce=r1", s.url), device.clone());
        let http = s.http.clone();
        async move {
            let resp = http.get(url).bearer_auth(device).send().await.expect("check");
            let status = resp.status();
            (status, resp.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    assert_eq!(check(&b).await.0, StatusCode::NO_CONTENT);

    // Published through A, offered by B once B's cache has reloaded.
    let img = image(31, 200_000);
    let first = release(&a, &api, &keys, "fleet", "1.0.0", 1, &img, json!({ "percent": 100 })).await;
    let offer = wait_for("replica B to offer the release published through A", LIMIT, || async {
        let (status, body) = check(&b).await;
        (status == StatusCode::OK).then_some(body)
    })
    .await;
    assert_eq!(offer["release_id"], first);
    let root = TrustRoot::from_trusted_json(a.trust_root(&keys).as_bytes()).expect("root");
    verify_assignment(
        offer["assignment"].as_str().expect("assignment").as_bytes(),
        &root,
        "dev-r",
        "r1",
        Timestamp::now(),
    )
    .expect("B signs with the shared rollout key");

    // A staged release the evaluator advances one stage per pass (no bars to meet).
    let mut stages: Vec<Value> = (1..=15).map(|p| json!({ "percent": p, "max_failure_rate": 1.0 })).collect();
    stages.push(json!({ "percent": 100, "max_failure_rate": 1.0 }));
    let img2 = image(32, 200_000);
    let staged = release(&a, &api, &keys, "fleet", "1.1.0", 2, &img2, json!({ "stages": stages })).await;

    let before = wait_for("two advances", LIMIT, || async {
        let adv = advances(&b, &admin, staged).await;
        (adv.len() >= 2).then_some(adv)
    })
    .await;
    let holder_actor = before[0].0.clone();
    assert!(before.iter().all(|(actor, _, _)| *actor == holder_actor), "one replica leads: {before:?}");
    let (holder, other) = if holder_actor == format!("evaluator@{}", a.state.instance) {
        (&a, &b)
    } else {
        assert_eq!(holder_actor, format!("evaluator@{}", b.state.instance));
        (&b, &a)
    };
    // Both replicas run their evaluator; only the lease holder evaluates.
    wait_for("the other replica to run its evaluator twice", LIMIT, || async {
        (other.state.metrics.evaluator_runs.load(Ordering::Relaxed) >= 2).then_some(())
    })
    .await;
    assert_eq!(other.state.metrics.evaluator_leader_runs.load(Ordering::Relaxed), 0, "the other never evaluated");
    assert!(holder.state.metrics.evaluator_leader_runs.load(Ordering::Relaxed) >= 2);

    // The holder shuts down and gives the lease back: the other takes over long before the
    // 10 min lease would have expired.
    let expires: i64 = sqlx::query_scalar("SELECT expires_at FROM leases WHERE name = 'rollout-evaluator'")
        .fetch_one(&other.state.db.pool)
        .await
        .expect("lease row");
    holder.stop();
    let other_actor = format!("evaluator@{}", other.state.instance);
    let taken = wait_for("the other replica to take over", LIMIT, || async {
        let adv = advances(other, &admin, staged).await;
        adv.iter().any(|(actor, _, _)| *actor == other_actor).then_some(adv)
    })
    .await;
    let first_by_other = taken.iter().find(|(actor, _, _)| *actor == other_actor).expect("taken over");
    assert!(first_by_other.2 < expires, "took over at {}, only when the lease expired at {expires}", first_by_other.2);
    let holder_led = holder.state.metrics.evaluator_leader_runs.load(Ordering::Relaxed);
    let after = wait_for("two more advances by the new holder", LIMIT, || async {
        let adv = advances(other, &admin, staged).await;
        (adv.iter().filter(|(actor, _, _)| *actor == other_actor).count() >= 2).then_some(adv)
    })
    .await;
    assert_eq!(holder.state.metrics.evaluator_leader_runs.load(Ordering::Relaxed), holder_led, "stopped holder idle");
    let holder_now: String = sqlx::query_scalar("SELECT holder FROM leases WHERE name = 'rollout-evaluator'")
        .fetch_one(&other.state.db.pool)
        .await
        .expect("lease row");
    assert_eq!(holder_now, other.state.instance);

    // Leadership moved once, and no stage was advanced twice: stages 1, 2, 3… in order.
    let actors: Vec<&str> = after.iter().map(|(actor, _, _)| actor.as_str()).collect();
    let switch = actors.iter().position(|a| *a == other_actor).expect("switch");
    assert!(actors[..switch].iter().all(|a| *a == holder_actor) && actors[switch..].iter().all(|a| *a == other_actor));
    let reached: Vec<i64> = after.iter().map(|(_, stage, _)| *stage).collect();
    assert_eq!(reached, (1..=after.len() as i64).collect::<Vec<_>>(), "each stage advanced exactly once");
}

crate::both_engines!(two_replicas_one_database);

/// On PostgreSQL a replica learns of another's changes through LISTEN/NOTIFY, not by its
/// periodic reload: here that reload is an hour apart, so only the notification can make B
/// offer a release published through A, and stop offering it once A halts it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_replicas_reload_on_notify() {
    let hourly = |c: &mut Config| c.cache_refresh = Duration::from_secs(3600);
    let a = start_with(Engine::Postgres, hourly).await;
    let (url, key) = (a.database_url.clone(), a.state.config.data_dir.join("rollout-key.pem"));
    let b = start_with(Engine::Postgres, |c| {
        hourly(c);
        c.database_url = Some(Secret::new(url));
        c.rollout_key_file = Some(key);
    })
    .await;
    let keys = Keys::new(33);
    let api = a.create_product("notify", &keys, SECRET).await;
    let device = b.enroll("notify", "dev-n", "stable", SECRET, None).await;
    let check = || {
        let (url, device, http) = (format!("{}/v1/updates/check", b.url), device.clone(), b.http.clone());
        async move { http.get(url).bearer_auth(device).send().await.expect("check").status() }
    };
    assert_eq!(check().await, StatusCode::NO_CONTENT);
    let reloads_before = b.state.cache.generation.load(Ordering::Relaxed);
    let id = release(&a, &api, &keys, "notify", "1.0.0", 1, &image(33, 100_000), json!({ "percent": 100 })).await;
    wait_for("B to offer the release published through A", LIMIT, || async {
        (check().await == StatusCode::OK).then_some(())
    })
    .await;
    assert!(b.state.cache.generation.load(Ordering::Relaxed) > reloads_before, "B reloaded its cache");

    let (status, body) = a.post(&format!("/v1/releases/{id}/halt"), Some(&a.admin), json!({ "reason": "test" })).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    wait_for("B to stop offering the halted release", LIMIT, || async {
        (check().await == StatusCode::NO_CONTENT).then_some(())
    })
    .await;
}
