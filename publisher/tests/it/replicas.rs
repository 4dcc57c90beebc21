//! Two `flotilla-coordinator` processes on one PostgreSQL database: only the replica holding
//! the evaluator lease advances a staged rollout, each stage exactly once; when it is killed,
//! the other takes over after the lease expires and finishes the rollout.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::{Coordinator, Engine, Flotilla, http_json, image, write};

/// The evaluator's advances of `release`, oldest first: (actor, stage reached).
fn advances(c: &Coordinator, admin: &str, release: i64) -> Vec<(String, i64)> {
    let v = http_json("GET", &format!("{}/v1/audit?limit=10000", c.url), admin, None);
    let mut out: Vec<(String, i64)> = v["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .filter(|e| e["action"] == "advance" && e["target"] == format!("release:{release}"))
        .map(|e| (e["actor"].as_str().expect("actor").to_owned(), e["after"]["stage"].as_i64().expect("stage")))
        .collect();
    out.reverse();
    out
}

/// `flotilla_evaluator_leader_runs_total` on one replica.
fn leader_runs(c: &Coordinator) -> u64 {
    let text = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("rt").block_on(async {
        reqwest::get(format!("{}/metrics", c.url)).await.expect("metrics").text().await.expect("text")
    });
    text.lines()
        .find_map(|l| l.strip_prefix("flotilla_evaluator_leader_runs_total "))
        .and_then(|v| v.trim().parse().ok())
        .expect("leader metric")
}

fn wait_until<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn two_processes_one_postgres_one_evaluator() {
    let config_dir = tempfile::tempdir().expect("tmp");
    let config = config_dir.path().join("coordinator.toml");
    std::fs::write(&config, "evaluator_interval = \"1s\"\nevaluator_lease = \"3s\"\ncache_refresh = \"200ms\"\n")
        .expect("config");
    let mut a = Coordinator::start_with(Engine::Postgres, None, &[("FLOTILLA_CONFIG", &config)]);
    let key = a.data.join("rollout-key.pem");
    let db = a.database_url.clone();
    let mut b = Coordinator::start_with(
        Engine::Postgres,
        Some(&db),
        &[("FLOTILLA_CONFIG", &config), ("FLOTILLA_ROLLOUT_KEY", &key)],
    );
    let admin = a.admin.clone();
    assert!(!admin.is_empty());

    // Publish through A a release with ten stages that the evaluator may advance at once.
    let cli = Flotilla::new(&a);
    let (rel_key, _) = cli.setup_product("ships");
    let stages: Vec<Value> = (1..=10).map(|i| json!({ "percent": i * 10, "min_duration": "0s" })).collect();
    http_json("PUT", &format!("{}/v1/products/ships/stages", a.url), &admin, Some(json!({ "stages": stages })));
    let img = write(&cli.path("os.img"), &image(41, 1 << 20));
    let r = cli.ok(&["release", "--product", "ships", "--image", &img, "--version", "1.0.0", "--key", &rel_key]);
    let id = r["id"].as_i64().expect("id");

    // A few advances happen while both run: all by one replica.
    let first = wait_until("three advances", || {
        let adv = advances(&b, &admin, id);
        (adv.len() >= 3).then_some(adv)
    });
    let leader = first[0].0.clone();
    assert!(first.iter().all(|(actor, _)| *actor == leader), "one evaluator while both run: {first:?}");
    let (a_runs, b_runs) = (leader_runs(&a), leader_runs(&b));
    assert!((a_runs == 0) != (b_runs == 0), "exactly one replica led: a={a_runs} b={b_runs}");

    // Kill the leader; the other takes over once the lease expires and finishes the rollout.
    let survivor = if a_runs > 0 {
        a.kill();
        &b
    } else {
        b.kill();
        &a
    };
    let all = wait_until("the rollout to complete", || {
        let adv = advances(survivor, &admin, id);
        (adv.last().is_some_and(|(_, stage)| *stage == 9)).then_some(adv)
    });
    let stages_reached: Vec<i64> = all.iter().map(|(_, s)| *s).collect();
    assert_eq!(stages_reached, (1..=9).collect::<Vec<_>>(), "each stage advanced exactly once: {all:?}");
    let actors: std::collections::BTreeSet<&str> = all.iter().map(|(a, _)| a.as_str()).collect();
    assert_eq!(actors.len(), 2, "the survivor took over: {all:?}");
    let switch = all.iter().position(|(a, _)| *a != leader).expect("takeover");
    assert!(all[switch..].iter().all(|(a, _)| *a != leader), "the killed replica never advanced again: {all:?}");
    let rel = http_json("GET", &format!("{}/v1/releases/{id}", survivor.url), &admin, None);
    assert_eq!(rel["rollout"]["state"], "completed", "{rel}");
}
