//! Named crash points for power-cut tests.
//!
//! The binary arms one point from `FLOTILLA_AGENT_CRASH_AT=<point>:<n>`; the library calls
//! [`point`] at each place where a power cut matters, and the n-th time the armed point is
//! reached the process aborts on the spot (no destructors, no flushing: as close to a power
//! cut or `kill -9` as a process can get to itself). Unarmed, a point costs one atomic load.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

static ARMED: AtomicBool = AtomicBool::new(false);
// A Mutex, not atomics: the name and the counter change together, and only tests arm it.
static TARGET: Mutex<Option<(String, u64)>> = Mutex::new(None);

/// Every crash point, in the order an install reaches them.
pub const POINTS: &[&str] = &[
    "journal-temp",
    "journal-renamed",
    "env-written",
    "marked-unbootable",
    "chunk-fetched",
    "chunk-written",
    "patch-chunk-fetched",
    "patch-chunk-written",
    "progress-saved",
    "slot-hashed",
    "staged",
    "activated",
    "recorded",
    "trial",
    "committed-env",
    "rolled-back-env",
    "probation-counted",
    "event-queued",
    "events-sent",
];

/// Arms `point`: the `n`-th time it is reached (1-based) the process aborts.
pub fn arm(point: &str, n: u64) {
    if let Ok(mut t) = TARGET.lock() {
        *t = Some((point.to_owned(), n.max(1)));
        ARMED.store(true, Ordering::SeqCst);
    }
}

/// Parses `<point>:<n>` (or `<point>`, meaning the first time).
pub fn arm_from_spec(spec: &str) -> Result<(), String> {
    let (name, n) = match spec.split_once(':') {
        Some((name, n)) => (name, n.parse::<u64>().map_err(|_| format!("bad crash count in {spec:?}"))?),
        None => (spec, 1),
    };
    if !POINTS.contains(&name) {
        return Err(format!("unknown crash point {name:?}; known: {}", POINTS.join(", ")));
    }
    arm(name, n);
    Ok(())
}

/// A place where a crash matters; aborts when armed for it and its count is reached.
pub fn point(name: &str) {
    if !ARMED.load(Ordering::Relaxed) {
        return;
    }
    if let Ok(mut t) = TARGET.lock()
        && let Some((target, left)) = t.as_mut()
        && target == name
    {
        *left -= 1;
        if *left == 0 {
            eprintln!("flotilla-agent: crash point {name} reached, aborting");
            std::process::abort();
        }
    }
}
