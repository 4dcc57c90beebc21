//! Staged rollouts: the plan a release follows, operator actions, the audit log, and the
//! evaluator that advances or pauses releases on reported failure rates.
//!
//! Only one replica evaluates at a time: the evaluator takes a lease row (an atomic
//! conditional update that works the same on SQLite and PostgreSQL) and every state change is
//! a conditional update on the state it read, so no action is applied twice.

use std::sync::atomic::Ordering;

use serde::{Deserialize, Serialize};
use sqlx::Row as _;

use crate::config::Stage;
use crate::db::now;
use crate::error::{ApiError, ApiResult};
use crate::state::AppState;

/// A release's rollout plan.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StagePlan {
    /// Stages, rising to 100 %.
    pub stages: Vec<Stage>,
    /// Whether the evaluator advances by itself (false: operators advance by hand).
    pub auto: bool,
}

/// Appends to the audit log.
///
/// # Errors
/// Database errors.
pub async fn audit(
    state: &AppState,
    actor: &str,
    action: &str,
    target: &str,
    before: Option<&serde_json::Value>,
    after: Option<&serde_json::Value>,
) -> Result<(), sqlx::Error> {
    sqlx::query("INSERT INTO audit (actor, action, target, before, after, created_at) VALUES ($1, $2, $3, $4, $5, $6)")
        .bind(actor)
        .bind(action)
        .bind(target)
        .bind(before.map(ToString::to_string))
        .bind(after.map(ToString::to_string))
        .bind(now())
        .execute(&state.db.pool)
        .await?;
    Ok(())
}

/// A release's rollout state as stored.
#[derive(Debug, Clone, Serialize)]
pub struct RolloutState {
    /// Release id.
    pub id: i64,
    /// Product.
    pub product: String,
    /// active | paused | halted | completed.
    pub state: String,
    /// Current stage index.
    pub stage: i64,
    /// Current share in basis points.
    pub basis_points: i64,
    /// When the stage began.
    pub stage_started: i64,
    /// Why it is paused or halted.
    pub reason: Option<String>,
    /// The plan.
    pub plan: StagePlan,
}

impl RolloutState {
    fn snapshot(&self) -> serde_json::Value {
        serde_json::json!({ "state": self.state, "stage": self.stage, "basis_points": self.basis_points, "reason": self.reason })
    }
}

/// Loads a release's rollout state.
///
/// # Errors
/// 404 when missing; database errors.
pub async fn load(state: &AppState, id: i64) -> ApiResult<RolloutState> {
    let row = sqlx::query("SELECT id, product, state, stage, basis_points, stage_started, state_reason, stage_plan FROM releases WHERE id = $1")
        .bind(id)
        .fetch_optional(&state.db.pool)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no release {id}")))?;
    let plan: String = row.try_get("stage_plan")?;
    Ok(RolloutState {
        id: row.try_get("id")?,
        product: row.try_get("product")?,
        state: row.try_get("state")?,
        stage: row.try_get("stage")?,
        basis_points: row.try_get("basis_points")?,
        stage_started: row.try_get("stage_started")?,
        reason: row.try_get("state_reason")?,
        plan: serde_json::from_str(&plan).map_err(ApiError::internal)?,
    })
}

/// An operator action on a rollout.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Stop widening; devices already in keep getting it.
    Pause(String),
    /// Continue after a pause.
    Resume,
    /// Move to the next stage now.
    Advance,
    /// Stop offering the release at all.
    Halt(String),
    /// Set the share directly (basis points).
    SetBasisPoints(u16),
}

impl Action {
    fn name(&self) -> &'static str {
        match self {
            Self::Pause(_) => "pause",
            Self::Resume => "resume",
            Self::Advance => "advance",
            Self::Halt(_) => "halt",
            Self::SetBasisPoints(_) => "set_percentage",
        }
    }
}

/// Applies `action` to release `id` if its state is still what was read (compare-and-set),
/// then records it in the audit log. Returns the new state.
///
/// # Errors
/// 404, 409 for an action that does not apply to the current state, database errors.
pub async fn apply(state: &AppState, actor: &str, id: i64, action: Action) -> ApiResult<RolloutState> {
    let cur = load(state, id).await?;
    let mut next = cur.clone();
    let t = now();
    match &action {
        Action::Pause(reason) => {
            if cur.state != "active" {
                return Err(ApiError::conflict(format!(
                    "release {id} is {}, only an active rollout can be paused",
                    cur.state
                )));
            }
            next.state = "paused".into();
            next.reason = Some(reason.clone());
        }
        Action::Resume => {
            if cur.state != "paused" {
                return Err(ApiError::conflict(format!(
                    "release {id} is {}, only a paused rollout can be resumed",
                    cur.state
                )));
            }
            next.state = "active".into();
            next.reason = None;
            next.stage_started = t;
        }
        Action::Advance => {
            if cur.state == "halted" {
                return Err(ApiError::conflict(format!("release {id} is halted")));
            }
            let stage = usize::try_from(cur.stage).unwrap_or(0) + 1;
            let Some(s) = cur.plan.stages.get(stage) else {
                return Err(ApiError::conflict(format!("release {id} is already at its last stage")));
            };
            next.stage = stage as i64;
            next.basis_points = i64::from(s.basis_points());
            next.stage_started = t;
            next.state = if stage + 1 == cur.plan.stages.len() { "completed".into() } else { "active".into() };
            next.reason = None;
        }
        Action::Halt(reason) => {
            if cur.state == "halted" {
                return Err(ApiError::conflict(format!("release {id} is already halted")));
            }
            next.state = "halted".into();
            next.reason = Some(reason.clone());
        }
        Action::SetBasisPoints(bp) => {
            if cur.state == "halted" {
                return Err(ApiError::conflict(format!("release {id} is halted")));
            }
            next.basis_points = i64::from(*bp);
            next.stage_started = t;
            if *bp == 10_000 {
                next.state = "completed".into();
            }
        }
    }
    let res = sqlx::query(
        "UPDATE releases SET state = $1, stage = $2, basis_points = $3, stage_started = $4, state_reason = $5 \
         WHERE id = $6 AND state = $7 AND stage = $8 AND basis_points = $9",
    )
    .bind(&next.state)
    .bind(next.stage)
    .bind(next.basis_points)
    .bind(next.stage_started)
    .bind(&next.reason)
    .bind(id)
    .bind(&cur.state)
    .bind(cur.stage)
    .bind(cur.basis_points)
    .execute(&state.db.pool)
    .await?;
    if res.rows_affected() != 1 {
        return Err(ApiError::conflict(format!("release {id} changed while this action was applied; retry")));
    }
    audit(state, actor, action.name(), &format!("release:{id}"), Some(&cur.snapshot()), Some(&next.snapshot())).await?;
    state.cache.reload(&state.db).await?;
    tracing::info!(release = id, action = action.name(), actor, "rollout changed");
    Ok(next)
}

/// Reports for a release since `since`: (healthy, failed).
///
/// # Errors
/// Database errors.
pub async fn reports(state: &AppState, id: i64, since: i64) -> Result<(i64, i64), sqlx::Error> {
    let row = sqlx::query(
        "SELECT CAST(COALESCE(SUM(CASE WHEN kind = 'healthy' THEN 1 ELSE 0 END), 0) AS BIGINT) AS ok, \
         CAST(COALESCE(SUM(CASE WHEN kind IN ('failed', 'rolled_back') THEN 1 ELSE 0 END), 0) AS BIGINT) AS bad \
         FROM events WHERE release_id = $1 AND created_at >= $2",
    )
    .bind(id)
    .bind(since)
    .fetch_one(&state.db.pool)
    .await?;
    Ok((row.try_get("ok")?, row.try_get("bad")?))
}

/// Name of the evaluator's lease.
const EVALUATOR_LEASE: &str = "rollout-evaluator";

/// Takes or renews a lease for `ttl_secs`. True when this replica holds it.
///
/// # Errors
/// Database errors.
pub async fn take_lease(state: &AppState, name: &str, ttl_secs: i64) -> Result<bool, sqlx::Error> {
    let t = now();
    let _ = sqlx::query("INSERT INTO leases (name, holder, expires_at) VALUES ($1, $2, $3)")
        .bind(name)
        .bind(&state.instance)
        .bind(t + ttl_secs)
        .execute(&state.db.pool)
        .await;
    let res = sqlx::query(
        "UPDATE leases SET holder = $1, expires_at = $2 WHERE name = $3 AND (holder = $1 OR expires_at < $4)",
    )
    .bind(&state.instance)
    .bind(t + ttl_secs)
    .bind(name)
    .bind(t)
    .execute(&state.db.pool)
    .await?;
    Ok(res.rows_affected() == 1)
}

/// Gives the evaluator's lease back if this replica holds it (a graceful shutdown), so another
/// replica takes over at its next pass instead of after the lease expires.
///
/// # Errors
/// Database errors.
pub async fn release_evaluator_lease(state: &AppState) -> Result<bool, sqlx::Error> {
    let res = sqlx::query("UPDATE leases SET expires_at = 0 WHERE name = $1 AND holder = $2")
        .bind(EVALUATOR_LEASE)
        .bind(&state.instance)
        .execute(&state.db.pool)
        .await?;
    Ok(res.rows_affected() == 1)
}

/// What one evaluation did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Evaluation {
    /// Whether this replica held the lease.
    pub leader: bool,
    /// Releases advanced.
    pub advanced: Vec<i64>,
    /// Releases paused (failure rate over the bar).
    pub paused: Vec<i64>,
    /// Releases halted by the crash-rate guardrail (no longer offered at all).
    pub halted: Vec<i64>,
}

/// One evaluator pass over every active automatic rollout.
///
/// # Errors
/// Database errors.
pub async fn evaluate(state: &AppState) -> ApiResult<Evaluation> {
    let lease = state.config.evaluator_lease();
    let lease_ttl = i64::try_from(lease.as_secs()).unwrap_or(i64::MAX / 2).max(1);
    let mut out = Evaluation::default();
    state.metrics.evaluator_runs.fetch_add(1, Ordering::Relaxed);
    if !take_lease(state, EVALUATOR_LEASE, lease_ttl).await? {
        return Ok(out);
    }
    out.leader = true;
    state.metrics.evaluator_leader_runs.fetch_add(1, Ordering::Relaxed);
    // The audit log names the replica that held the lease for each action it took.
    let actor = format!("evaluator@{}", state.instance);
    let rows: Vec<(i64, String)> = sqlx::query_as(
        "SELECT id, state FROM releases WHERE state IN ('active', 'paused', 'completed') AND archived = 0",
    )
    .fetch_all(&state.db.pool)
    .await?;
    for (id, rollout_state) in rows {
        // The crash-rate guardrail: when installs fail en masse (over the whole release, whether
        // its rollout is active, paused or complete), stop offering it at all rather than only
        // stop widening it.
        let (all_ok, all_bad) = reports(state, id, 0).await?;
        let all = all_ok + all_bad;
        let guard = &state.config.guardrail;
        if all > 0 && all as u64 >= guard.min_reports && all_bad as f64 / all as f64 >= guard.failure_rate {
            let reason = format!(
                "crash-rate guardrail: {all_bad} of {all} installs failed ({:.1} %, limit {:.1} %); no longer offered",
                100.0 * all_bad as f64 / all as f64,
                guard.failure_rate * 100.0
            );
            match apply(state, &actor, id, Action::Halt(reason)).await {
                Ok(_) => out.halted.push(id),
                Err(e) if e.status == axum::http::StatusCode::CONFLICT => {}
                Err(e) => return Err(e),
            }
            continue;
        }
        if rollout_state != "active" {
            continue;
        }
        let cur = load(state, id).await?;
        let Some(stage) = cur.plan.stages.get(usize::try_from(cur.stage).unwrap_or(0)).cloned() else { continue };
        let (ok, bad) = reports(state, id, cur.stage_started).await?;
        let total = ok + bad;
        let rate = if total > 0 { bad as f64 / total as f64 } else { 0.0 };
        // The crash-rate guardrail applies to manual rollouts too: a spike stops the widening.
        if total > 0 && rate > stage.max_failure_rate {
            let reason = format!(
                "failure rate {:.1} % over {total} reports exceeds {:.1} %",
                rate * 100.0,
                stage.max_failure_rate * 100.0
            );
            match apply(state, &actor, id, Action::Pause(reason)).await {
                Ok(_) => out.paused.push(id),
                Err(e) if e.status == axum::http::StatusCode::CONFLICT => {}
                Err(e) => return Err(e),
            }
            continue;
        }
        let elapsed = now() - cur.stage_started;
        if cur.plan.auto
            && (total as u64) >= stage.min_reports
            && elapsed >= stage.min_duration.as_secs() as i64
            && usize::try_from(cur.stage).unwrap_or(0) + 1 < cur.plan.stages.len()
        {
            match apply(state, &actor, id, Action::Advance).await {
                Ok(_) => out.advanced.push(id),
                Err(e) if e.status == axum::http::StatusCode::CONFLICT => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(out)
}
