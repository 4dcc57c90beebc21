//! Crash-loop probation after a commit (DESIGN.md: "keep a crash-loop probation window after
//! marking good"; the security study's PROBATION state).
//!
//! A slot that passed its trial can still crash-loop later: a service that dies after the
//! health check ran, an app that renders once and then crashes at every launch (HotPatch's
//! and Capacitor's crash counter). For a window after the commit — `probation_boots` healthy
//! boots and `probation_time`, both when both are set — the agent keeps counting: every boot
//! of the committed slot counts as a crash *before* its health checks run and is cleared when
//! it reaches healthy (checks pass, and the app marks itself healthy when
//! `mark_good_timeout` is set); `flotilla-agent report-crash` (an app's crash handler, a
//! systemd `OnFailure=` hook) counts one too. `crash_limit` crashes in a row switch the
//! device back to the previous slot, which no install may overwrite meanwhile, and blacklist
//! the release. Once the window is over the commit is final: the `security_version` floor
//! rises and later failures are fixed forward.

use std::time::Duration;

use flotilla_core::time::Timestamp;
use serde::{Deserialize, Serialize};

use crate::config::HealthConfig;

/// The configured window and limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProbationPolicy {
    /// Healthy boots after the commit before it is final.
    pub boots: u32,
    /// Time after the commit before it is final.
    pub time: Option<Duration>,
    /// Crashes in a row (boots not reaching healthy, reported crashes) that roll back.
    pub crash_limit: u32,
}

impl ProbationPolicy {
    /// The policy of a config; `None` when probation is off (`probation_boots = 0` and no
    /// `probation_time`): a commit is then final at once.
    pub fn from_config(health: &HealthConfig) -> Option<Self> {
        (health.probation_boots > 0 || health.probation_time.is_some()).then_some(Self {
            boots: health.probation_boots,
            time: health.probation_time,
            crash_limit: health.crash_limit.max(1),
        })
    }
}

/// The persisted probation of the committed slot (in the journal).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Probation {
    /// When the slot was committed.
    pub since: Timestamp,
    /// Boots since the commit that reached healthy.
    pub healthy_boots: u32,
    /// Crashes in a row: boots that have not (yet) reached healthy, plus reported crashes,
    /// since the last healthy boot.
    pub crashes: u32,
}

impl Probation {
    /// A probation starting at `now`.
    pub fn start(now: Timestamp) -> Self {
        Self { since: now, healthy_boots: 0, crashes: 0 }
    }

    /// A boot or a reported crash: counted before anything that could crash again runs.
    pub fn count_crash(&mut self) {
        self.crashes = self.crashes.saturating_add(1);
    }

    /// The boot reached healthy: the run of crashes is over.
    pub fn healthy_boot(&mut self) {
        self.crashes = 0;
        self.healthy_boots = self.healthy_boots.saturating_add(1);
    }

    /// Whether the crashes in a row reached the limit.
    pub fn is_crash_loop(&self, policy: &ProbationPolicy) -> bool {
        self.crashes >= policy.crash_limit
    }

    /// Whether the window is over at `now` (a clock set back keeps it open).
    pub fn is_over(&self, policy: &ProbationPolicy, now: Timestamp) -> bool {
        let boots_done = self.healthy_boots >= policy.boots;
        let time_done = policy.time.is_none_or(|t| now >= self.since.saturating_add(t));
        boots_done && time_done && self.crashes == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(boots: u32, time: Option<u64>, limit: u32) -> ProbationPolicy {
        ProbationPolicy { boots, time: time.map(Duration::from_secs), crash_limit: limit }
    }

    #[test]
    fn off_unless_configured() {
        let mut h = HealthConfig::default();
        assert_eq!(ProbationPolicy::from_config(&h), None);
        h.probation_time = Some(Duration::from_secs(60));
        assert_eq!(ProbationPolicy::from_config(&h), Some(policy(0, Some(60), 3)));
    }

    #[test]
    fn window_needs_boots_and_time() {
        let p0 = Timestamp::from_unix(1_000);
        let pol = policy(2, Some(600), 3);
        let mut p = Probation::start(p0);
        assert!(!p.is_over(&pol, Timestamp::from_unix(5_000)), "no healthy boot yet");
        p.count_crash();
        p.healthy_boot();
        p.count_crash();
        p.healthy_boot();
        assert!(!p.is_over(&pol, Timestamp::from_unix(1_599)), "time not up");
        assert!(p.is_over(&pol, Timestamp::from_unix(1_600)));
        assert!(!p.is_over(&pol, Timestamp::from_unix(999)), "a clock set back keeps it open");
        p.count_crash();
        assert!(!p.is_over(&pol, Timestamp::from_unix(9_999)), "a crash in progress keeps it open");
    }

    #[test]
    fn crashes_in_a_row_reach_the_limit_and_a_healthy_boot_clears_them() {
        let pol = policy(5, None, 2);
        let mut p = Probation::start(Timestamp::from_unix(0));
        p.count_crash();
        assert!(!p.is_crash_loop(&pol));
        p.healthy_boot();
        p.count_crash();
        assert!(!p.is_crash_loop(&pol));
        p.count_crash();
        assert!(p.is_crash_loop(&pol));
        assert_eq!(p.healthy_boots, 1);
    }
}
