//! The agent's side of the crash-loop probation ([`crate::probation`]): counting boots and
//! reported crashes of the committed slot, rolling back a crash loop, ending the window.

use flotilla_core::time::Timestamp;

use super::{Agent, AgentError, BootReport};
use crate::crash;
use crate::events::EventKind;
use crate::journal::{ByteSources, Journal, State};
use crate::probation::ProbationPolicy;
use crate::slot::SlotName;

/// Why a crash loop rolls back, as events and reports say it.
const CRASH_LOOP: &str = "crash loop during probation";

impl Agent {
    /// Ends the probation when its window is over; returns the version still on probation,
    /// if one is (installs must then wait: the fallback slot stays intact).
    ///
    /// # Errors
    /// Saving the journal.
    pub(super) fn probation_gate(&self, j: &mut Journal) -> Result<Option<String>, AgentError> {
        self.settle_probation(j)?;
        Ok(j.probation.and(j.installed.as_ref()).map(|r| r.version.clone()))
    }

    /// Makes the commit final when the window is over (or probation was turned off): the
    /// `security_version` floor rises now, and from here on failures are fixed forward.
    fn settle_probation(&self, j: &mut Journal) -> Result<(), AgentError> {
        let Some(p) = j.probation else { return Ok(()) };
        let over =
            ProbationPolicy::from_config(&self.config.health).is_none_or(|pol| p.is_over(&pol, Timestamp::now()));
        if !over {
            return Ok(());
        }
        j.probation = None;
        if let Some(r) = &j.installed {
            j.security_floor = j.security_floor.max(r.security_version);
            tracing::info!(version = %r.version, healthy_boots = p.healthy_boots, "probation over; the release is final");
        }
        j.save(&self.paths.journal())?;
        Ok(())
    }

    /// A boot during probation: counted as a crash before the health checks run, cleared
    /// when the boot reaches healthy; `crash_limit` in a row roll back.
    pub(super) async fn probation_boot(&self, j: &mut Journal, booted: SlotName) -> Result<BootReport, AgentError> {
        let Some(policy) = ProbationPolicy::from_config(&self.config.health) else {
            self.settle_probation(j)?;
            self.boot.mark_good(booted)?;
            return Ok(BootReport::Normal { slot: booted });
        };
        if booted != j.active {
            let why = format!(
                "{CRASH_LOOP}: slot {} used up its boot tries and the bootloader fell back to slot {booted}",
                j.active
            );
            return self.probation_rollback(j, why);
        }
        let Some(p) = j.probation.as_mut() else { return Ok(BootReport::Normal { slot: booted }) };
        p.count_crash();
        let crashes = p.crashes;
        // Counted before the checks run: a boot that hangs or dies in them still counts.
        j.save(&self.paths.journal())?;
        crash::point("probation-counted");
        let limit = policy.crash_limit;
        if crashes > limit {
            return self.probation_rollback(j, format!("{CRASH_LOOP}: {limit} boots in a row did not reach healthy"));
        }
        let _ = std::fs::remove_file(self.paths.healthy_flag());
        let mut result = crate::health::run_checks(&self.config.health).await.map_err(|e| e.to_string());
        if result.is_ok()
            && let Some(timeout) = self.config.health.mark_good_timeout
            && let Some(r) = j.installed.clone()
        {
            result = self.wait_mark_good(&r, timeout).await;
        }
        match result {
            Ok(()) => {
                if let Some(p) = j.probation.as_mut() {
                    p.healthy_boot();
                }
                self.boot.mark_good(booted)?;
                j.save(&self.paths.journal())?;
                let _ = std::fs::remove_file(self.paths.healthy_flag());
                self.settle_probation(j)?;
                Ok(BootReport::Normal { slot: booted })
            }
            Err(why) if crashes >= limit => self.probation_rollback(
                j,
                format!("{CRASH_LOOP}: {why} ({crashes} boots in a row did not reach healthy, limit {limit})"),
            ),
            Err(why) => {
                tracing::warn!(reason = %why, crashes, limit, "boot on probation did not reach healthy");
                Ok(BootReport::RetryAfterReboot { reason: format!("{why} (on probation)"), attempts: crashes, limit })
            }
        }
    }

    /// Back to the previous slot, intact because nothing was installed during probation; the
    /// release is blacklisted and reported `rolled_back`.
    fn probation_rollback(&self, j: &mut Journal, why: String) -> Result<BootReport, AgentError> {
        let (bad, good) = (j.active, j.active.other());
        let release = j.installed.clone();
        tracing::error!(slot = %bad, version = ?release.as_ref().map(|r| &r.version), reason = %why, "rolling back");
        self.boot.rollback(good, bad)?;
        if let Some(r) = &release
            && !j.blacklist.contains(&r.manifest_sha256)
        {
            j.blacklist.push(r.manifest_sha256);
        }
        j.installed = j.previous.take();
        j.active = good;
        j.probation = None;
        j.last_error = Some(why.clone());
        let e = Self::new_event(EventKind::RolledBack, release.as_ref(), ByteSources::default(), Some(why.clone()));
        self.record(j, Some(State::RolledBack), e)?;
        let _ = std::fs::remove_file(self.paths.healthy_flag());
        Ok(BootReport::RolledBack { slot: good, reason: why })
    }

    /// An app (or a systemd `OnFailure=` hook) reports a crash of the committed release. On
    /// probation it counts toward `crash_limit` and the last one rolls back; returns `None`
    /// when nothing is on probation (a crash of a final release is fixed forward).
    ///
    /// # Errors
    /// The journal or the bootloader state.
    pub async fn report_crash(&self) -> Result<Option<BootReport>, AgentError> {
        let lock = self.lock(true)?;
        let mut j = self.journal_locked()?;
        if j.state != State::Committed {
            return Ok(None);
        }
        self.settle_probation(&mut j)?;
        let (Some(policy), Some(p)) = (ProbationPolicy::from_config(&self.config.health), j.probation.as_mut()) else {
            return Ok(None);
        };
        p.count_crash();
        let crashes = p.crashes;
        let report = if p.is_crash_loop(&policy) {
            let limit = policy.crash_limit;
            self.probation_rollback(&mut j, format!("{CRASH_LOOP}: {crashes} crashes in a row (limit {limit})"))?
        } else {
            j.save(&self.paths.journal())?;
            let reason = "crash reported during probation".to_owned();
            BootReport::RetryAfterReboot { reason, attempts: crashes, limit: policy.crash_limit }
        };
        drop(lock);
        let _ = self.flush_events().await;
        Ok(Some(report))
    }
}
